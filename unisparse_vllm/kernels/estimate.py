"""Block mass in the compressed space, fused: ``core.batch_block_mass`` without the
``(n / c_q) x ((C+n) / c_k)`` score matrix in memory.

Pooling (an O(tokens x d) pass) stays in PyTorch and reuses ``core``'s functions; the kernel
does the O(n (C+n) d / (c_q c_k)) part. Composite queries are laid out per plan row
(``B / c_q`` slots per query block) and composite keys per key block (``B / c_k`` slots),
so one program owns ``ROWS`` consecutive rows of one request and walks their causal key
blocks twice: pass 1 finds each composite query's softmax max and sum (online), pass 2 sums
probabilities per key block and averages them over each row's composite queries (and, for
``max_mix``, keeps their largest one per block pair).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import UniSparseConfig
from ..core import KVSource, PrefillBatch, num_key_blocks, query_block_range
from ..core.estimate import composite_keys, composite_queries, mix_peak
from .attention import dot_precision

# Composite queries / keys per program tile (a tl.dot needs 16 or more on each side).
TILE = 64
_NOT_VISIBLE = tl.constexpr(2**30)  # first-token position of an empty composite-key slot


@triton.jit
def _block_mass_kernel(
    q_ptr,
    q_last_ptr,
    k_ptr,
    k_first_ptr,
    mass_ptr,
    peak_ptr,
    tile_row_ptr,
    tile_rows_ptr,
    row_block_ptr,
    row_kb_offset_ptr,
    stride_qh,
    stride_qrow,
    stride_qslot,
    stride_kh,
    stride_kblock,
    stride_kslot,
    stride_mh,
    stride_mrow,
    qk_scale,
    GROUP_SEL_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    Q_PER_BLOCK: tl.constexpr,
    K_PER_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KEY_BLOCKS: tl.constexpr,
    PEAK: tl.constexpr,
):
    sel = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = sel // GROUP_SEL_PER_KV
    first_row = tl.load(tile_row_ptr + tile)
    num_rows = tl.load(tile_rows_ptr + tile)

    BM: tl.constexpr = ROWS * Q_PER_BLOCK
    BN: tl.constexpr = KEY_BLOCKS * K_PER_BLOCK
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    row_of_m = offs_m // Q_PER_BLOCK
    slot_of_m = offs_m % Q_PER_BLOCK
    m_rows_ok = row_of_m < num_rows
    q_row = (first_row + row_of_m).to(tl.int64)
    q = tl.load(
        q_ptr
        + sel * stride_qh
        + q_row[:, None] * stride_qrow
        + slot_of_m[:, None] * stride_qslot
        + offs_d[None, :],
        mask=m_rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    q_last = tl.load(q_last_ptr + q_row * Q_PER_BLOCK + slot_of_m, mask=m_rows_ok, other=-1)

    last_row = first_row + num_rows - 1
    kb_offset = tl.load(row_kb_offset_ptr + first_row)  # the request's first key block
    num_kb = tl.load(row_block_ptr + last_row) + 1  # causal key blocks of the tile
    k_base = k_ptr + kv_head * stride_kh + kb_offset * stride_kblock
    kf_base = k_first_ptr + kb_offset * K_PER_BLOCK

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    for pass_ in tl.static_range(2):
        for kb in range(0, num_kb, KEY_BLOCKS):
            block_of_n = kb + offs_n // K_PER_BLOCK
            n_ok = block_of_n < num_kb
            k_slot = (kb * K_PER_BLOCK + offs_n).to(tl.int64)
            k = tl.load(
                k_base
                + (k_slot // K_PER_BLOCK)[:, None] * stride_kblock
                + (k_slot % K_PER_BLOCK)[:, None] * stride_kslot
                + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
                other=0.0,
            )
            k_first = tl.load(kf_base + k_slot, mask=n_ok, other=_NOT_VISIBLE)
            visible = k_first[None, :] <= q_last[:, None]
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            scores = tl.where(visible, scores, float("-inf"))
            if pass_ == 0:
                m_new = tl.maximum(m_i, tl.max(scores, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(scores - m_safe[:, None])
                l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(p, 1)
                m_i = m_new
            else:
                m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
                l_safe = tl.where(l_i == 0.0, 1.0, l_i)
                probs = tl.math.exp2(scores - m_safe[:, None]) / l_safe[:, None]
                per_block = tl.sum(tl.reshape(probs, [BM, KEY_BLOCKS, K_PER_BLOCK]), 2)
                per_row = tl.sum(tl.reshape(per_block, [ROWS, Q_PER_BLOCK, KEY_BLOCKS]), 1)
                is_q = (q_last >= 0).to(tl.float32)
                valid_q = tl.sum(tl.reshape(is_q, [ROWS, Q_PER_BLOCK]), 1)
                per_row = per_row / tl.where(valid_q == 0.0, 1.0, valid_q)[:, None]
                offs_r = tl.arange(0, ROWS)
                offs_b = kb + tl.arange(0, KEY_BLOCKS)
                out = (
                    sel * stride_mh + (first_row + offs_r)[:, None] * stride_mrow + offs_b[None, :]
                )
                in_tile = (offs_r[:, None] < num_rows) & (offs_b[None, :] < num_kb)
                tl.store(mass_ptr + out, per_row, mask=in_tile)
                if PEAK:
                    peak = tl.max(tl.reshape(probs, [BM, KEY_BLOCKS, K_PER_BLOCK]), 2)
                    peak = tl.max(tl.reshape(peak, [ROWS, Q_PER_BLOCK, KEY_BLOCKS]), 1)
                    tl.store(peak_ptr + out, peak, mask=in_tile)


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
    """Same contract as ``core.plan.batch_block_mass``."""
    block_size, c_q, c_k = config.block_size, config.c_q, config.c_k
    q_per_block, k_per_block = block_size // c_q, block_size // c_k
    num_sel = query.shape[1] // c_h
    num_kv = kv.num_kv_heads
    device = query.device
    rows_per_request = [
        len(query_block_range(c, n, block_size))
        for c, n in zip(batch.context_lens, batch.query_lens, strict=True)
    ]
    num_rows = sum(rows_per_request)
    width = max(num_key_blocks(s, block_size) for s in batch.seq_lens)
    key_blocks = [
        num_key_blocks(s, block_size) if e else 0
        for s, e in zip(batch.seq_lens, estimated, strict=True)
    ]

    # Pool in fp32; the dot runs in the input dtype (tensor cores for bf16/fp16).
    dim, dot_dtype = query.shape[2], query.dtype
    total_kb = max(sum(key_blocks), 1)
    q_slots = query.new_zeros(num_sel, num_rows * q_per_block, dim)
    q_last = torch.full((num_rows * q_per_block,), -1, dtype=torch.int32, device=device)
    k_slots = query.new_zeros(num_kv, total_kb * k_per_block, dim)
    k_first = torch.full(
        (total_kb * k_per_block,), _NOT_VISIBLE.value, dtype=torch.int32, device=device
    )
    row_block = torch.zeros(num_rows, dtype=torch.int32, device=device)
    row_kb_offset = torch.zeros(num_rows, dtype=torch.int32, device=device)
    tiles: list[tuple[int, int]] = []
    rows_per_tile = TILE // q_per_block

    first_row, first_kb = 0, 0
    for r, (c, n) in enumerate(zip(batch.context_lens, batch.query_lens, strict=True)):
        rows = query_block_range(c, n, block_size)
        if estimated[r]:
            chunk = query[batch.query_slice(r)].float()
            pooled, q_first, last = composite_queries(chunk, c, c_q, c_h)
            # Slot of each composite query, counted from the request's first row.
            slot = first_row * q_per_block + q_first // c_q - rows.start * q_per_block
            q_slots[:, slot] = pooled.to(dot_dtype)
            q_last[slot] = last.to(torch.int32)
            keys = kv.request_keys(r, c + n)
            pooled_k, k_pos = composite_keys(keys.float(), c_k)
            k_slot = first_kb * k_per_block + k_pos // c_k
            k_slots[:, k_slot] = pooled_k.to(dot_dtype)
            k_first[k_slot] = k_pos.to(torch.int32)
            block_ids = torch.arange(rows.start, rows.stop, device=device, dtype=torch.int32)
            row_block[first_row : first_row + len(rows)] = block_ids
            row_kb_offset[first_row : first_row + len(rows)] = first_kb
            tiles += [
                (first_row + t, min(rows_per_tile, len(rows) - t))
                for t in range(0, len(rows), rows_per_tile)
            ]
            first_kb += key_blocks[r]
        first_row += len(rows)

    mass = torch.zeros(num_sel, num_rows, width, dtype=torch.float32, device=device)
    peak = torch.zeros_like(mass) if config.max_mix > 0 else mass
    tile_row = torch.tensor([t[0] for t in tiles], dtype=torch.int32, device=device)
    tile_rows = torch.tensor([t[1] for t in tiles], dtype=torch.int32, device=device)
    _block_mass_kernel[(num_sel, len(tiles))](
        q_slots,
        q_last,
        k_slots,
        k_first,
        mass,
        peak,
        tile_row,
        tile_rows,
        row_block,
        row_kb_offset,
        q_slots.stride(0),
        q_per_block * q_slots.stride(1),
        q_slots.stride(1),
        k_slots.stride(0),
        k_per_block * k_slots.stride(1),
        k_slots.stride(1),
        mass.stride(0),
        mass.stride(1),
        scale * 1.4426950408889634,
        GROUP_SEL_PER_KV=num_sel // num_kv,
        HEAD_DIM=dim,
        BLOCK_D=triton.next_power_of_2(dim),
        Q_PER_BLOCK=q_per_block,
        K_PER_BLOCK=k_per_block,
        DOT_PRECISION=dot_precision(dot_dtype),
        ROWS=rows_per_tile,
        KEY_BLOCKS=TILE // k_per_block,
        PEAK=config.max_mix > 0,
        num_warps=4,
    )
    return mix_peak(mass, peak, config.max_mix)
