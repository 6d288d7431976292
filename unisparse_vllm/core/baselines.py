"""Peers' block-scoring rules as estimators with our interface (``BatchMassEstimator``), so a
comparison changes only the choice of blocks: same selection, same plan, same kernel.

- ``xattention_block_mass``: XAttention-style antidiagonal scoring. With stride ``S``, the
  score of strided query ``u`` against strided key ``v`` is the sum of the raw scores on one
  antidiagonal of their ``S x S`` tile, ``sum_t q[uS+S-1-t] . k[vS+t]``: the dot product of
  the reversed concatenation of ``S`` queries with the concatenation of ``S`` keys. Softmax
  over visible strided keys, summed per key block and averaged per query block, as ours.
  (Our reading of the paper; the 1/S on the logits, keeping them at the scale of one score,
  is our choice.)
- ``last_block_block_mass``: FlexPrefill-style query-aware estimate, reduced to its core:
  exact attention of the chunk's last query block, summed per key block, stands for every
  row (renormalised over each row's causal blocks). The per-head choice between this and a
  vertical-slash pattern (FlexPrefill's JS-divergence test) is not modelled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import UniSparseConfig
from .batch import KVSource, PrefillBatch, num_key_blocks, working_dtype
from .estimate import pool_heads
from .metrics import exact_key_block_probs
from .plan import BatchMassEstimator, batch_block_mass, per_request_mass


def xattention_block_mass(
    query: Tensor,
    kv: KVSource,
    batch: PrefillBatch,
    estimated: Sequence[bool],
    *,
    config: UniSparseConfig,
    c_h: int,
    scale: float,
    stride: int = 8,
) -> Tensor:
    block = config.block_size

    def mass_of(q: Tensor, keys: Tensor, context: int, rows: range) -> Tensor:
        n, seq_len = q.shape[0], keys.shape[0]
        group = q.shape[1] // keys.shape[1]
        # Not always float64: the [heads, L/S, L/S] scores are the largest tensor of any
        # estimator here, and in float64 this rule took 2.3 s a 32K prompt on the H200
        # against 0.8 s for ours (benchmarks/RESULTS.md section 4, eighth run).
        work = working_dtype(q)
        q = pool_heads(q.to(work), c_h)  # [n, Hs, d]
        device = q.device
        k = keys.to(work)[:, torch.arange(q.shape[1], device=device) * c_h // group]  # [L, Hs, d]
        # Pad both to whole strides at absolute positions; padded slots are masked below.
        q_pad = q.new_zeros(rows.stop * block - rows.start * block, *q.shape[1:])
        q_pad[context - rows.start * block : context - rows.start * block + n] = q
        k_pad = k.new_zeros(num_key_blocks(seq_len, block) * block, *k.shape[1:])
        k_pad[:seq_len] = k
        hs, dim = q.shape[1], q.shape[2]
        q_cat = (
            q_pad.view(-1, stride, hs, dim)
            .flip(1)
            .permute(2, 0, 1, 3)
            .reshape(hs, -1, stride * dim)
        )
        k_cat = k_pad.view(-1, stride, hs, dim).permute(2, 0, 1, 3).reshape(hs, -1, stride * dim)
        scores = torch.einsum("hud,hvd->huv", q_cat, k_cat) * scale / stride
        u_last = rows.start * block + torch.arange(q_cat.shape[1], device=device) * stride
        u_last += stride - 1
        v_first = torch.arange(k_cat.shape[1], device=device) * stride
        visible = (v_first[None, :] <= u_last[:, None]) & (v_first[None, :] < seq_len)
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        per_block = probs.view(hs, probs.shape[1], -1, block // stride).sum(-1)
        return per_block.view(hs, len(rows), block // stride, -1).mean(2)

    return per_request_mass(query, kv, batch, estimated, query.shape[1] // c_h, block, mass_of)


def last_block_block_mass(
    query: Tensor,
    kv: KVSource,
    batch: PrefillBatch,
    estimated: Sequence[bool],
    *,
    config: UniSparseConfig,
    c_h: int,
    scale: float,
) -> Tensor:
    block = config.block_size

    def mass_of(q: Tensor, keys: Tensor, context: int, rows: range) -> Tensor:
        last = q[-block:]
        first_pos = context + q.shape[0] - last.shape[0]
        probs = exact_key_block_probs(last, keys, first_pos, block, scale).mean(dim=1)  # [Hq, kb]
        probs = probs.view(-1, c_h, probs.shape[1]).mean(dim=1)  # [Hs, kb]
        key_blocks = torch.arange(probs.shape[1], device=q.device)
        causal = (
            key_blocks[None, :] <= torch.arange(rows.start, rows.stop, device=q.device)[:, None]
        )
        mass = probs[:, None, :] * causal[None]
        return mass / mass.sum(dim=2, keepdim=True).clamp(min=1e-30)

    return per_request_mass(query, kv, batch, estimated, query.shape[1] // c_h, block, mass_of)


ESTIMATORS: dict[str, BatchMassEstimator] = {
    "unisparse": batch_block_mass,
    "xattention": xattention_block_mass,
    "last_block": last_block_block_mass,
}
