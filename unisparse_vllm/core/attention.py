"""Reference attention for a prefill batch: dense causal, and block-sparse over a plan.

Plain PyTorch, one request and one query block at a time so memory stays at
``block_size x (C+n)`` per head; computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .batch import KVSource, PrefillBatch, num_key_blocks, query_block_range, working_dtype
from .plan import BlockPlan


def _attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """``q [Hq, m, d]``, ``k``/``v`` ``[Hq, L, d]``, ``allowed [Hq, m, L]`` -> ``[Hq, m, d]``."""
    scores = torch.einsum("hmd,hld->hml", q, k) * scale
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hml,hld->hmd", probs, v)


def _prefill_attention(
    query: Tensor,
    kv: KVSource,
    batch: PrefillBatch,
    scale: float,
    plan: BlockPlan | None,
    out: Tensor | None,
) -> Tensor:
    work = working_dtype(query)
    out = torch.empty_like(query) if out is None else out
    num_heads = query.shape[1]
    for r, (c, n) in enumerate(zip(batch.context_lens, batch.query_lens, strict=True)):
        keys, values = kv.keys_values(r, c + n)
        group = num_heads // keys.shape[1]
        k = keys.to(work).repeat_interleave(group, dim=1).transpose(0, 1)
        v = values.to(work).repeat_interleave(group, dim=1).transpose(0, 1)
        q = query[batch.query_slice(r)].to(work).transpose(0, 1)
        key_pos = torch.arange(c + n, device=query.device)
        # Dense attention is tiled the same way, only to bound memory.
        block_size = plan.block_size if plan is not None else 128
        if plan is not None:
            sel_of_head = torch.arange(num_heads, device=query.device) // plan.heads_per_selection
            blocks = plan.block_mask(r, num_key_blocks(c + n, block_size))[sel_of_head]
        for row, i in enumerate(query_block_range(c, n, block_size)):
            lo, hi = max(i * block_size, c), min((i + 1) * block_size, c + n)
            # Keys past the row's last query are never visible: leave them out.
            causal = key_pos[None, :hi] <= torch.arange(lo, hi, device=query.device)[:, None]
            allowed = causal.expand(num_heads, -1, -1)
            if plan is not None:
                allowed = allowed & blocks[:, row, key_pos[:hi] // block_size][:, None, :]
            out_rows = _attend(q[:, lo - c : hi - c], k[:, :hi], v[:, :hi], allowed, scale)
            out[batch.query_start[r] + lo - c : batch.query_start[r] + hi - c] = out_rows.transpose(
                0, 1
            ).to(query.dtype)
    return out


def dense_attention(
    query: Tensor, kv: KVSource, batch: PrefillBatch, scale: float, out: Tensor | None = None
) -> Tensor:
    """Exact causal attention of each chunk over its request's context and itself.

    ``query [T, Hq, d]`` packed per ``batch``; returns ``[T, Hq, d]`` in ``query``'s dtype,
    written into ``out`` when given.
    """
    return _prefill_attention(query, kv, batch, scale, None, out)


def sparse_attention(
    query: Tensor,
    kv: KVSource,
    batch: PrefillBatch,
    plan: BlockPlan,
    scale: float,
    out: Tensor | None = None,
) -> Tensor:
    """Exact softmax attention restricted to the plan's key blocks (token-causal on the
    diagonal block); dropped blocks get probability zero. Written into ``out`` when given."""
    return _prefill_attention(query, kv, batch, scale, plan, out)
