"""Fidelity metrics of ALGORITHM.md section 9, computed against exact attention.

These form token-level probabilities one query block at a time (they are for measuring, not
for serving), reduced at once to per-key-block mass ``[Hq, n, key blocks]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .attention import dense_attention
from .batch import KVSource, PrefillBatch, num_key_blocks, query_block_range, working_dtype
from .plan import BlockPlan


def exact_key_block_probs(
    query: Tensor, keys: Tensor, context_len: int, block_size: int, scale: float
) -> Tensor:
    """Exact causal softmax of each query token, summed per key block: ``[Hq, n, key blocks]``."""
    n, num_heads, _ = query.shape
    seq_len = keys.shape[0]
    work = working_dtype(query)
    num_kv_heads = keys.shape[1]
    # Grouped, not repeated: the keys in the working dtype once per KV head (at 128K tokens
    # with Llama-8B heads, repeating them per query head would take 2 GB in float32).
    k = keys.to(work).transpose(0, 1)  # [Hkv, L, d]
    key_block = torch.arange(seq_len, device=query.device) // block_size
    out = query.new_zeros(num_heads, n, num_key_blocks(seq_len, block_size), dtype=work)
    for start in range(0, n, block_size):
        q = query[start : start + block_size].to(work)
        m = q.shape[0]
        q = q.view(m, num_kv_heads, num_heads // num_kv_heads, -1).permute(1, 2, 0, 3)
        end = context_len + start + m  # keys past the last query are never visible
        pos = torch.arange(context_len + start, end, device=query.device)
        scores = torch.einsum("hgmd,hld->hgml", q, k[:, :end]).reshape(num_heads, m, end) * scale
        causal = torch.arange(end, device=query.device)[None, :] <= pos[:, None]
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        out[:, start : start + m].index_add_(2, key_block[:end], probs)
    return out


@dataclass(frozen=True)
class ExactAttention:
    """Dense attention of a batch and its exact per-key-block probabilities: what every
    sparse plan of the same inputs is measured against (compute once, reuse per plan)."""

    output: Tensor
    key_block_probs: list[Tensor]  # per request, [Hq, n, key blocks]


def exact_attention(
    query: Tensor, kv: KVSource, batch: PrefillBatch, block_size: int, scale: float
) -> ExactAttention:
    probs = []
    for r, (c, n) in enumerate(zip(batch.context_lens, batch.query_lens, strict=True)):
        keys = kv.request_keys(r, c + n)
        probs.append(exact_key_block_probs(query[batch.query_slice(r)], keys, c, block_size, scale))
    return ExactAttention(dense_attention(query, kv, batch, scale), probs)


def relative_error(output: Tensor, reference: Tensor) -> float:
    """``||output - reference|| / ||reference||`` in float64."""
    diff = (output.double() - reference.double()).norm()
    return float(diff / reference.double().norm())


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties ranked by position)."""
    if a.numel() < 2:
        return 1.0
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return float((ra * rb).sum() / denom) if denom > 0 else 1.0


@dataclass(frozen=True)
class Fidelity:
    density: float
    mass_recall_mean: float
    mass_recall_min: float
    relative_error: float
    rank_correlation_median: float


def mass_recall(probs: Tensor, plan: BlockPlan, request: int, context_len: int) -> Tensor:
    """Exact attention mass inside the plan's blocks, per (query head, token) of ``request``.

    ``probs`` is the request's ``exact_key_block_probs`` ``[Hq, n, key blocks]``.
    """
    num_heads, n, num_kb = probs.shape
    first_row = context_len // plan.block_size
    token_row = torch.arange(context_len, context_len + n, device=probs.device) // plan.block_size
    sel_of_head = torch.arange(num_heads, device=probs.device) // plan.heads_per_selection
    selected = plan.block_mask(request, num_kb)[sel_of_head][:, token_row - first_row]
    return (probs * selected).sum(dim=2)


def fidelity(
    plan: BlockPlan,
    batch: PrefillBatch,
    exact: ExactAttention,
    sparse_output: Tensor,
    estimated_mass: list[Tensor] | None = None,
) -> Fidelity:
    """All section-9 metrics of one plan against the exact attention of the same inputs.

    ``estimated_mass[r]`` (``[H_sel, query blocks, key blocks]``, as ``block_mass`` returns)
    gives the rank correlation against exact block mass, per (head, row) over its causal
    blocks; rows with fewer than 3 causal blocks are skipped.
    """
    recalls, correlations = [], []
    c_h = plan.heads_per_selection
    for r, (c, n) in enumerate(zip(batch.context_lens, batch.query_lens, strict=True)):
        probs = exact.key_block_probs[r]
        num_heads, _, num_kb = probs.shape
        rows = query_block_range(c, n, plan.block_size)
        recalls.append(mass_recall(probs, plan, r, c).flatten())
        if estimated_mass is None:
            continue
        token_row = (torch.arange(c, c + n, device=probs.device) // plan.block_size) - rows.start
        exact_mass = probs.new_zeros(num_heads, len(rows), num_kb).index_add_(1, token_row, probs)
        exact_mass = exact_mass / torch.bincount(token_row, minlength=len(rows))[None, :, None]
        exact_mass = exact_mass.reshape(-1, c_h, len(rows), num_kb).mean(dim=1)
        for h in range(exact_mass.shape[0]):
            for row, i in enumerate(rows):
                if i >= 2:
                    correlations.append(
                        spearman(estimated_mass[r][h, row, : i + 1], exact_mass[h, row, : i + 1])
                    )
    recall = torch.cat(recalls)
    median = float(torch.tensor(correlations).median()) if correlations else float("nan")
    return Fidelity(
        density=plan.density(),
        mass_recall_mean=float(recall.mean()),
        mass_recall_min=float(recall.min()),
        relative_error=relative_error(sparse_output, exact.output),
        rank_correlation_median=median,
    )


def attended_pairs(plan: BlockPlan, batch: PrefillBatch) -> tuple[int, int]:
    """``(computed, dense)`` causal (query token, key token) pairs summed over selection heads:
    the attention work of the plan against dense causal attention."""
    block = plan.block_size
    context = torch.tensor(batch.context_lens, device=plan.counts.device)[plan.row_request.long()]
    seq = (
        context + torch.tensor(batch.query_lens, device=plan.counts.device)[plan.row_request.long()]
    )
    i = plan.row_block.long()
    lo, hi = torch.maximum(i * block, context), torch.minimum((i + 1) * block, seq)
    rows = hi - lo
    # Pairs on the diagonal block: query p sees keys i*block .. p.
    diagonal = (hi - i * block) * (hi - i * block + 1) // 2 - (lo - i * block) * (
        lo - i * block + 1
    ) // 2
    full_blocks = (plan.counts.long() - 1) * (rows * block)[None]  # the others are whole
    computed = int((full_blocks + diagonal[None]).sum())
    dense = int(((i * block * rows + diagonal) * plan.counts.shape[0]).sum())
    return computed, dense
