"""Block mass estimation in the compressed space (ALGORITHM.md sections 2-3).

Composite tokens are means of ``c_q`` queries / ``c_k`` keys aligned to absolute positions,
so a prefill split at multiples of the block size sees the same composites as one shot.
Nothing here forms the token-level ``n x (C+n)`` score matrix: the largest intermediate is
``(n / c_q) x ((C+n) / c_k)`` per selection head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .batch import num_key_blocks, query_block_range, working_dtype


def pool_heads(query: Tensor, c_h: int) -> Tensor:
    """``[n, Hq, d]`` -> ``[n, Hq / c_h, d]``: mean of ``c_h`` adjacent query heads.

    Adjacent heads share a KV head (vLLM orders query heads group by group) as long as
    ``c_h`` divides the group size, which the config checks.
    """
    n, num_heads, dim = query.shape
    return query.reshape(n, num_heads // c_h, c_h, dim).mean(dim=2)


def _pool_positions(x: Tensor, first_pos: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean of ``x[t]`` (token ``first_pos + t``) over groups ``[g*width, (g+1)*width)`` of
    absolute positions, true counts for partial groups. Returns ``(means [G, H, d],
    first token of each group, last token of each group)`` in absolute positions."""
    n = x.shape[0]
    pos = torch.arange(first_pos, first_pos + n, device=x.device)
    group = pos // width - first_pos // width
    num_groups = (first_pos + n - 1) // width - first_pos // width + 1  # no host sync
    sums = x.new_zeros(num_groups, *x.shape[1:]).index_add_(0, group, x)
    counts = torch.zeros(num_groups, device=x.device, dtype=x.dtype).index_add_(
        0, group, torch.ones(n, device=x.device, dtype=x.dtype)
    )
    first = torch.full((num_groups,), first_pos + n, device=x.device, dtype=torch.long)
    first = first.scatter_reduce(0, group, pos, reduce="amin")
    last = torch.zeros(num_groups, device=x.device, dtype=torch.long).scatter_reduce(
        0, group, pos, reduce="amax"
    )
    return sums / counts[:, None, None], first, last


def composite_queries(
    query: Tensor, first_pos: int, c_q: int, c_h: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Query chunk ``[n, Hq, d]`` starting at ``first_pos`` -> composite queries
    ``[Hq / c_h, m, d]`` with each one's first and last absolute token position."""
    pooled, first, last = _pool_positions(pool_heads(query, c_h), first_pos, c_q)
    return pooled.transpose(0, 1), first, last


def composite_keys(keys: Tensor, c_k: int) -> tuple[Tensor, Tensor]:
    """Keys ``[L, Hkv, d]`` at positions ``0..L-1`` -> ``([Hkv, L / c_k, d], first position)``.
    Keys are never head-pooled."""
    pooled, first, _ = _pool_positions(keys, 0, c_k)
    return pooled.transpose(0, 1), first


def mix_peak(mass: Tensor, peak: Tensor, max_mix: float) -> Tensor:
    """``(1 - max_mix) M + max_mix P / rowsum(P)``, ``P`` = largest composite-pair probability
    per (query block, key block). Mean pooling over a block's composite queries dilutes
    one query that locks onto one key block (ALGORITHM.md section 7); the peak term keeps
    it. Rows still sum to 1."""
    if max_mix == 0.0:
        return mass
    peak = peak / peak.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(peak.dtype).tiny)
    return (1.0 - max_mix) * mass + max_mix * peak


def block_mass(
    query: Tensor,
    keys: Tensor,
    context_len: int,
    *,
    block_size: int,
    c_q: int,
    c_k: int,
    c_h: int,
    scale: float,
    max_mix: float = 0.0,
) -> Tensor:
    """Estimated block mass ``M [Hq / c_h, query blocks of the chunk, key blocks]``.

    ``query`` is the chunk ``[n, Hq, d]`` at positions ``context_len ..``; ``keys`` are all
    ``context_len + n`` keys ``[L, Hkv, d]``. Softmax over composite keys whose first token is
    not after the composite query's last token; ``M[h, i, j]`` is the mean over block ``i``'s
    composite queries of the softmax mass on block ``j``'s composite keys, so rows sum to 1;
    ``max_mix > 0`` mixes in the peak term (``mix_peak``).
    """
    work = working_dtype(query)
    num_sel_heads = query.shape[1] // c_h
    group = query.shape[1] // keys.shape[1]
    q_c, _, q_last = composite_queries(query.to(work), context_len, c_q, c_h)
    k_c, k_first = composite_keys(keys.to(work), c_k)
    # Selection head s pools query heads s*c_h .. (s+1)*c_h-1, all of KV head s*c_h // group.
    kv_of_sel = torch.arange(num_sel_heads, device=query.device) * c_h // group
    scores = torch.einsum("hmd,hkd->hmk", q_c, k_c[kv_of_sel]) * scale
    visible = k_first[None, :] <= q_last[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)

    n_kb = num_key_blocks(keys.shape[0], block_size)
    per_key_block = probs.new_zeros(num_sel_heads, probs.shape[1], n_kb).index_add_(
        2, k_first // block_size, probs
    )
    q_rows = query_block_range(context_len, query.shape[0], block_size)
    q_block = q_last // block_size - q_rows.start
    sums = probs.new_zeros(num_sel_heads, len(q_rows), n_kb).index_add_(1, q_block, per_key_block)
    counts = torch.bincount(q_block, minlength=len(q_rows)).to(work)
    mass = sums / counts[None, :, None]
    if max_mix == 0.0:
        return mass
    key_block = (k_first // block_size).expand(num_sel_heads, probs.shape[1], -1)
    peak_per_query = probs.new_zeros(num_sel_heads, probs.shape[1], n_kb).scatter_reduce_(
        2, key_block, probs, reduce="amax"
    )
    rows = q_block[None, :, None].expand(num_sel_heads, -1, n_kb)
    peak = mass.new_zeros(mass.shape).scatter_reduce_(1, rows, peak_per_query, reduce="amax")
    return mix_peak(mass, peak, max_mix)
