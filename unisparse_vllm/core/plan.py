"""The block plan: the one interface between selection ("what to compute") and attention
("how"). Same shape of data as FlexAttention's BlockMask (``kv_num_blocks``, ``kv_indices``),
flattened over the rows of a varlen batch."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..config import LayerBudget, UniSparseConfig
from .batch import KVSource, PrefillBatch, num_key_blocks, query_block_range
from .estimate import block_mass
from .select import select_blocks


@dataclass(frozen=True)
class BlockPlan:
    """Selected key blocks per (selection head, row); a row is one (request, query block).

    Query head ``h`` uses selection head ``h // heads_per_selection``.
    ``indices[s, row, :counts[s, row]]`` are ascending absolute key-block indices; -1 after.
    """

    block_size: int
    heads_per_selection: int
    counts: Tensor  # [H_sel, rows] int32
    indices: Tensor  # [H_sel, rows, W] int32
    row_request: Tensor  # [rows] int32
    row_block: Tensor  # [rows] int32, absolute query block index

    @property
    def num_rows(self) -> int:
        return int(self.row_block.shape[0])

    def block_totals(self) -> tuple[int, int]:
        """``(selected, causal)`` key blocks summed over every head and row (a host sync,
        once: a plan's tensors are not written after selection). The serving path uses
        ``selected_blocks`` and ``causal_row_blocks`` instead, which do not wait."""
        return self._totals

    def selected_blocks(self) -> Tensor:
        """Key blocks selected, summed over every head and row: a 0-d tensor on the plan's
        device, so that reading the count is left to whoever needs it, when it is ready."""
        return self.counts.sum()

    @functools.cached_property
    def _totals(self) -> tuple[int, int]:
        causal = int((self.row_block.long() + 1).sum()) * self.counts.shape[0]
        return int(self.counts.sum()), causal

    def density(self) -> float:
        """Selected blocks over causal blocks, over every head and row."""
        selected, causal = self.block_totals()
        return selected / causal

    def block_mask(self, request: int, num_kv_blocks: int) -> Tensor:
        """Request's rows as a boolean ``[H_sel, its query blocks, num_kv_blocks]``."""
        rows = (self.row_request == request).nonzero().flatten().to(self.indices.device)
        idx = self.indices[:, rows].long()
        mask = torch.zeros(
            idx.shape[0], idx.shape[1], num_kv_blocks + 1, dtype=torch.bool, device=idx.device
        )
        mask.scatter_(2, torch.where(idx < 0, num_kv_blocks, idx), True)
        return mask[..., :num_kv_blocks]


def request_rows(batch: PrefillBatch, block_size: int) -> tuple[Tensor, Tensor]:
    """``(row_request, row_block)`` for every query block of every request, in order."""
    requests, blocks = [], []
    for r, (c, n) in enumerate(zip(batch.context_lens, batch.query_lens, strict=True)):
        rows = query_block_range(c, n, block_size)
        requests += [r] * len(rows)
        blocks += list(rows)
    return torch.tensor(requests, dtype=torch.int32), torch.tensor(blocks, dtype=torch.int32)


@functools.lru_cache(maxsize=16)
def causal_row_blocks(batch: PrefillBatch, block_size: int) -> int:
    """Causal key blocks of every query block of the batch (one selection head), from the
    host's lengths: the same for every layer of a step, and known without the device."""
    return sum(
        block + 1
        for c, n in zip(batch.context_lens, batch.query_lens, strict=True)
        for block in query_block_range(c, n, block_size)
    )


class BatchMassEstimator(Protocol):
    """Estimated mass ``[H_sel, rows, max key blocks]`` of the requests marked ``estimated``
    (zero rows for the others); ``batch_block_mass`` below is the reference."""

    def __call__(
        self,
        query: Tensor,
        kv: KVSource,
        batch: PrefillBatch,
        estimated: Sequence[bool],
        *,
        config: UniSparseConfig,
        c_h: int,
        scale: float,
    ) -> Tensor: ...


RequestMass = Callable[[Tensor, Tensor, int, range], Tensor]
# ``select_blocks``'s signature: (mass, query_block, budget, dense_rows) -> (counts, indices)
Selector = Callable[[Tensor, Tensor, LayerBudget, Tensor | None], tuple[Tensor, Tensor]]


def per_request_mass(
    query: Tensor,
    kv: KVSource,
    batch: PrefillBatch,
    estimated: Sequence[bool],
    num_sel_heads: int,
    block_size: int,
    mass_of: RequestMass,
) -> Tensor:
    """A batch estimator from a one-request one: ``mass_of(chunk query, keys, context, rows)``
    -> ``[H_sel, rows, key blocks]``; zero rows for requests not estimated, padded to the
    batch's widest row."""
    width = max(num_key_blocks(s, block_size) for s in batch.seq_lens)
    masses = []
    for r, (c, n) in enumerate(zip(batch.context_lens, batch.query_lens, strict=True)):
        rows = query_block_range(c, n, block_size)
        mass = query.new_zeros(num_sel_heads, len(rows), width, dtype=torch.float32)
        if estimated[r]:
            keys = kv.request_keys(r, c + n)
            got = mass_of(query[batch.query_slice(r)], keys, c, rows)
            mass[..., : got.shape[2]] = got.float()
        masses.append(mass)
    return torch.cat(masses, dim=1)


def batch_block_mass(
    query: Tensor,
    kv: KVSource,
    batch: PrefillBatch,
    estimated: Sequence[bool],
    *,
    config: UniSparseConfig,
    c_h: int,
    scale: float,
) -> Tensor:
    """``block_mass`` of each estimated request, padded to the batch's widest row."""

    def mass_of(chunk: Tensor, keys: Tensor, context: int, rows: range) -> Tensor:
        return block_mass(
            chunk,
            keys,
            context,
            block_size=config.block_size,
            c_q=config.c_q,
            c_k=config.c_k,
            c_h=c_h,
            scale=scale,
            max_mix=config.max_mix,
        )

    return per_request_mass(
        query, kv, batch, estimated, query.shape[1] // c_h, config.block_size, mass_of
    )


@dataclass(frozen=True)
class StepRows:
    """The rows of a prefill step, the same for every layer: ``row_request``/``row_block``
    (as in ``BlockPlan``), ``dense [rows]`` (rows that take every causal block) and, per
    request, whether it is estimated at all."""

    row_request: Tensor
    row_block: Tensor
    dense: Tensor
    estimated: tuple[bool, ...]
    rows_per_request: tuple[int, ...]


@functools.lru_cache(maxsize=16)
def step_rows(
    batch: PrefillBatch,
    block_size: int,
    min_sparse_tokens: int,
    dense_tail_blocks: int,
    prompt_ends: tuple[int, ...],
    device: torch.device,
) -> StepRows:
    """Built once per step, not per layer (FlashInfer's plan/run split): the tables cost
    Python work and three host-to-device copies (0.4 ms per call at 32K tokens on the
    development CPU). A pure function of its arguments, so cached; callers never write
    into the tensors.

    Dense rows (ALGORITHM.md sections 5-6): every row of a decode (one query token) or of a
    prompt shorter than ``min_sparse_tokens`` (``prompt_ends[r]``: so every chunk of a long
    prompt is sparse, however the scheduler cut it), and the last ``dense_tail_blocks`` query
    blocks before ``prompt_ends[r]``."""
    row_request, row_block = request_rows(batch, block_size)
    estimated, dense, counts = [], [], []
    for r, (c, n) in enumerate(zip(batch.context_lens, batch.query_lens, strict=True)):
        tail_start = num_key_blocks(prompt_ends[r], block_size) - dense_tail_blocks
        # A single query token is a decode step: it stays dense (spec section 5).
        request_dense = n == 1 or prompt_ends[r] < min_sparse_tokens
        estimated.append(not request_dense)
        blocks = query_block_range(c, n, block_size)
        dense += [request_dense or i >= tail_start for i in blocks]
        counts.append(len(blocks))
    return StepRows(
        row_request.to(device),
        row_block.to(device),
        torch.tensor(dense, device=device),
        tuple(estimated),
        tuple(counts),
    )


@functools.lru_cache(maxsize=64)
def rows_of_requests(
    rows_per_request: tuple[int, ...], requests: tuple[int, ...], device: torch.device
) -> Tensor:
    """The row indices of ``requests``: cached, since a step's layers ask for the same ones."""
    starts = [0, *itertools.accumulate(rows_per_request)]
    return torch.cat([torch.arange(starts[r], starts[r + 1]) for r in requests]).to(device)


def select_per_budget(
    selector: Selector,
    mass: Tensor,
    rows: StepRows,
    budgets: tuple[LayerBudget, ...],
    dense: Tensor,
) -> tuple[Tensor, Tensor]:
    """``selector`` over the rows of each request with that request's budget: one call when
    the requests share one (the usual step), else one call per distinct budget."""
    distinct = dict.fromkeys(budgets)
    if len(distinct) == 1:
        return selector(mass, rows.row_block, budgets[0], dense)
    counts = torch.empty(mass.shape[:2], dtype=torch.int32, device=mass.device)
    indices = torch.empty(mass.shape, dtype=torch.int32, device=mass.device)
    for budget in distinct:
        requests = tuple(r for r, b in enumerate(budgets) if b == budget)
        at = rows_of_requests(rows.rows_per_request, requests, mass.device)
        counts[:, at], indices[:, at] = selector(mass[:, at], rows.row_block[at], budget, dense[at])
    return counts, indices


def plan_prefill(
    query: Tensor,
    kv: KVSource,
    batch: PrefillBatch,
    config: UniSparseConfig,
    budget: LayerBudget | Sequence[LayerBudget],
    *,
    scale: float,
    prompt_lens: tuple[int, ...] | None = None,
    estimator: BatchMassEstimator | None = None,
    selector: Selector = select_blocks,
) -> BlockPlan:
    """Estimate block mass (``estimator``, default: ``config.estimator``'s reference) and
    select blocks (``selector``) for a whole prefill batch, with ``budget`` for every
    request or, a sequence, one per request (``config.length_tiers``).

    ``prompt_lens[r]`` is request ``r``'s prompt length where the caller knows it (vLLM's
    attention metadata does not carry it; ``backend.compat.prompt_lengths`` reads it from
    the model runner); default: the chunk's end, as if every chunk ended its prompt.
    Dense rows: those of ``step_rows`` (decodes, short prompts, the last
    ``dense_tail_blocks`` query blocks before the prompt's end), and every row of a dense
    layer.
    """
    if estimator is None:
        from .baselines import ESTIMATORS  # the peers' rules build on this module

        estimator = ESTIMATORS[config.estimator]
    block_size = config.block_size
    c_h = config.heads_per_selection(query.shape[1], kv.num_kv_heads)
    rows = step_rows(
        batch,
        block_size,
        config.min_sparse_tokens,
        config.dense_tail_blocks,
        prompt_lens or batch.seq_lens,
        query.device,
    )
    budgets = (budget,) * batch.num_requests if isinstance(budget, LayerBudget) else tuple(budget)
    if len(budgets) != batch.num_requests:
        raise ValueError(
            f"budget: {len(budgets)} budgets for a batch of {batch.num_requests} requests"
        )
    estimated = [e and not b.dense for e, b in zip(rows.estimated, budgets, strict=True)]
    dense_requests = tuple(r for r, b in enumerate(budgets) if b.dense)
    if len(dense_requests) == len(budgets):
        dense = torch.ones_like(rows.dense)
    elif dense_requests:
        dense = rows.dense.clone()
        dense[rows_of_requests(rows.rows_per_request, dense_requests, dense.device)] = True
    else:
        dense = rows.dense
    if any(estimated):
        mass = estimator(query, kv, batch, estimated, config=config, c_h=c_h, scale=scale)
    else:
        width = max(num_key_blocks(s, block_size) for s in batch.seq_lens)
        mass = query.new_zeros(query.shape[1] // c_h, len(dense), width, dtype=torch.float32)
    counts, indices = select_per_budget(selector, mass, rows, budgets, dense)
    return BlockPlan(
        block_size=block_size,
        heads_per_selection=c_h,
        counts=counts,
        indices=indices,
        row_request=rows.row_request,
        row_block=rows.row_block,
    )
