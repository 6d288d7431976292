"""Block mass in the compressed space, fused: ``core.batch_block_mass`` without the
``(n / c_q) x ((C+n) / c_k)`` score matrix in memory.

Three launches: composite keys pooled straight from the paged cache, composite queries
pooled from the chunk (heads too), then the O(n (C+n) d / (c_q c_k)) block-mass kernel. Their
index tables are built on the host from integers and copied in one transfer, so the cost
does not grow with the number of requests. Composite queries are laid out per plan row
(``B / c_q`` slots per query block) and composite keys per key block (``B / c_k`` slots),
so one program owns ``ROWS`` consecutive rows of one request and walks their causal key
blocks twice: pass 1 finds each composite query's softmax max and sum (online), pass 2 sums
probabilities per key block and averages them over each row's composite queries (and, for
``max_mix``, keeps their largest one per block pair).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import UniSparseConfig
from ..core import (
    KVSource,
    PagedKV,
    PrefillBatch,
    int32_tables,
    num_key_blocks,
    query_block_range,
)
from ..core.estimate import mix_peak
from .attention import dot_precision

# Composite queries / keys per program tile (a tl.dot needs 16 or more on each side).
TILE = 64
_NOT_VISIBLE = tl.constexpr(2**30)  # first-token position of an empty composite-key slot


@triton.jit(do_not_specialize=["stride_table"], do_not_specialize_on_alignment=["block_table_ptr"])
def _pool_keys_kernel(
    key_cache_ptr,
    block_table_ptr,
    slot_request_ptr,
    request_kb_ptr,
    seq_len_ptr,
    out_ptr,
    first_ptr,
    stride_cpage,
    stride_ctok,
    stride_chead,
    stride_table,
    stride_oh,
    stride_os,
    page_size,
    C_K: tl.constexpr,
    K_PER_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Composite key ``slot`` of KV head ``head``: the mean of its ``c_k`` keys (fewer at the
    sequence end), read through the block table; a slot past the sequence is not visible."""
    head = tl.program_id(0)
    slot = tl.program_id(1)
    request = tl.load(slot_request_ptr + slot)
    first = (slot - tl.load(request_kb_ptr + request) * K_PER_BLOCK) * C_K
    seq_len = tl.load(seq_len_ptr + request)
    pos = first + tl.arange(0, C_K)
    in_seq = pos < seq_len
    page = tl.load(block_table_ptr + request * stride_table + pos // page_size, mask=in_seq)
    offs_d = tl.arange(0, BLOCK_D)
    keys = tl.load(
        key_cache_ptr
        + page.to(tl.int64)[:, None] * stride_cpage
        + (pos % page_size)[:, None] * stride_ctok
        + head * stride_chead
        + offs_d[None, :],
        mask=in_seq[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    count = tl.maximum(tl.sum(in_seq.to(tl.float32), 0), 1.0)
    mean = tl.sum(keys.to(tl.float32), 0) / count
    out = out_ptr + head * stride_oh + slot * stride_os + offs_d
    tl.store(out, mean.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
    if head == 0:
        tl.store(first_ptr + slot, tl.where(first < seq_len, first, _NOT_VISIBLE))


@triton.jit
def _pool_queries_kernel(
    query_ptr,
    row_request_ptr,
    row_block_ptr,
    request_ptr,
    out_ptr,
    last_ptr,
    stride_qtok,
    stride_qhead,
    stride_oh,
    stride_os,
    C_Q: tl.constexpr,
    C_H: tl.constexpr,
    Q_PER_BLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Composite query ``slot`` (plan row ``slot // Q_PER_BLOCK``) of selection head ``sel``:
    the mean over its ``c_q`` positions (those inside the chunk) and ``c_h`` query heads;
    ``last`` = its last position, -1 for an empty slot or a request not estimated."""
    sel = tl.program_id(0)
    slot = tl.program_id(1)
    row = slot // Q_PER_BLOCK
    request = tl.load(row_request_ptr + row)
    # Per request: context length, query length, first token row, estimated (0/1).
    context = tl.load(request_ptr + request * 4)
    chunk = tl.load(request_ptr + request * 4 + 1)
    token_start = tl.load(request_ptr + request * 4 + 2)
    estimated = tl.load(request_ptr + request * 4 + 3)
    pos = tl.load(row_block_ptr + row) * BLOCK_SIZE + (slot % Q_PER_BLOCK) * C_Q
    pos += tl.arange(0, C_Q)
    in_chunk = (pos >= context) & (pos < context + chunk * estimated)  # none if not estimated
    offs_d = tl.arange(0, BLOCK_D)
    token = (token_start + pos - context).to(tl.int64)
    total = tl.zeros([BLOCK_D], tl.float32)
    for h in tl.static_range(C_H):
        q = tl.load(
            query_ptr
            + token[:, None] * stride_qtok
            + (sel * C_H + h) * stride_qhead
            + offs_d[None, :],
            mask=in_chunk[:, None] & (offs_d[None, :] < HEAD_DIM),
            other=0.0,
        )
        total += tl.sum(q.to(tl.float32), 0)
    count = tl.maximum(tl.sum(in_chunk.to(tl.float32), 0), 1.0) * C_H
    out = out_ptr + sel * stride_oh + slot * stride_os + offs_d
    tl.store(out, (total / count).to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
    if sel == 0:
        tl.store(last_ptr + slot, tl.max(tl.where(in_chunk, pos, -1), 0))


@triton.jit(do_not_specialize=["stride_mh", "stride_mrow"])
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


def tile_blocks(q_per_block: int, k_per_block: int) -> tuple[int, int]:
    """``(query blocks, key blocks)`` per block-mass tile: ``TILE`` composites a side, but at
    least one whole block, so that ``c_q = c_k = 1`` (128 composites a block; with ``c_h = 1``
    the exact block mass, the oracle that bounds every estimator) runs as one block a tile."""
    return max(1, TILE // q_per_block), max(1, TILE // k_per_block)


@functools.lru_cache(maxsize=16)
def index_tables(
    batch: PrefillBatch,
    estimated: tuple[bool, ...],
    block_size: int,
    c_q: int,
    c_k: int,
    device: torch.device,
) -> tuple[Tensor, ...]:
    """The estimator's index tables, built from integers with one host-to-device copy, once
    per step (the same for every layer; cached like ``core.plan.step_rows``). Per request:
    context, chunk, first token row, estimated (0/1), first key block in the composite-key
    slots; then the sequence lengths; per plan row: request, query block, its request's
    first key block; per block-mass tile: first row and rows; per composite-key slot:
    request."""
    q_per_block, k_per_block = block_size // c_q, block_size // c_k
    requests: list[int] = []
    request_kb: list[int] = []
    row_request: list[int] = []
    row_block: list[int] = []
    row_kb: list[int] = []
    tile_row: list[int] = []
    tile_rows: list[int] = []
    key_slots: list[int] = []
    rows_per_tile, first_kb = tile_blocks(q_per_block, k_per_block)[0], 0
    for r, (c, n) in enumerate(zip(batch.context_lens, batch.query_lens, strict=True)):
        blocks = query_block_range(c, n, block_size)
        requests += [c, n, batch.query_start[r], int(estimated[r])]
        request_kb.append(first_kb)
        if estimated[r]:
            starts = range(0, len(blocks), rows_per_tile)
            tile_row += [len(row_block) + t for t in starts]
            tile_rows += [min(rows_per_tile, len(blocks) - t) for t in starts]
        row_request += [r] * len(blocks)
        row_block += list(blocks)
        row_kb += [first_kb] * len(blocks)
        if estimated[r]:
            kb = num_key_blocks(c + n, block_size)
            key_slots += [r] * (kb * k_per_block)
            first_kb += kb
    parts = (
        requests,
        request_kb,
        list(batch.seq_lens),
        row_request,
        row_block,
        row_kb,
        tile_row,
        tile_rows,
        key_slots,
    )
    return int32_tables(parts, device)


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
    """Same contract as ``core.plan.batch_block_mass``, for a paged cache."""
    if not isinstance(kv, PagedKV):
        raise TypeError(f"the fused estimator reads a paged KV cache, got {type(kv).__name__}")
    block_size, c_q, c_k = config.block_size, config.c_q, config.c_k
    q_per_block, k_per_block = block_size // c_q, block_size // c_k
    num_sel = query.shape[1] // c_h
    num_kv = kv.num_kv_heads
    device = query.device
    width = max(num_key_blocks(s, block_size) for s in batch.seq_lens)

    tables = index_tables(batch, tuple(estimated), block_size, c_q, c_k, device)
    (
        request_t,
        request_kb_t,
        seq_len_t,
        row_request_t,
        row_block_t,
        row_kb_t,
        tile_row_t,
        tile_rows_t,
        key_slot_t,
    ) = tables
    num_rows, num_key_slots, num_tiles = len(row_block_t), len(key_slot_t), len(tile_row_t)

    # Pool in fp32; the dot runs in the input dtype (tensor cores for bf16/fp16).
    dim, dot_dtype = query.shape[2], query.dtype
    block_d = triton.next_power_of_2(dim)
    q_slots = query.new_empty(num_sel, num_rows * q_per_block, dim)
    q_last = torch.empty(num_rows * q_per_block, dtype=torch.int32, device=device)
    _pool_queries_kernel[(num_sel, num_rows * q_per_block)](
        query,
        row_request_t,
        row_block_t,
        request_t,
        q_slots,
        q_last,
        query.stride(0),
        query.stride(1),
        q_slots.stride(0),
        q_slots.stride(1),
        C_Q=c_q,
        C_H=c_h,
        Q_PER_BLOCK=q_per_block,
        BLOCK_SIZE=block_size,
        HEAD_DIM=dim,
        BLOCK_D=block_d,
    )
    k_slots = query.new_empty(num_kv, num_key_slots, dim)
    k_first = torch.empty(num_key_slots, dtype=torch.int32, device=device)
    _pool_keys_kernel[(num_kv, num_key_slots)](
        kv.key_cache,
        kv.block_table,
        key_slot_t,
        request_kb_t,
        seq_len_t,
        k_slots,
        k_first,
        kv.key_cache.stride(0),
        kv.key_cache.stride(1),
        kv.key_cache.stride(2),
        kv.block_table.stride(0),
        k_slots.stride(0),
        k_slots.stride(1),
        kv.page_size,
        C_K=c_k,
        K_PER_BLOCK=k_per_block,
        HEAD_DIM=dim,
        BLOCK_D=block_d,
    )
    mass = torch.zeros(num_sel, num_rows, width, dtype=torch.float32, device=device)
    rows_per_tile, key_blocks_per_tile = tile_blocks(q_per_block, k_per_block)
    scores_per_tile = rows_per_tile * q_per_block * key_blocks_per_tile * k_per_block
    peak = torch.zeros_like(mass) if config.max_mix > 0 else mass
    _block_mass_kernel[(num_sel, num_tiles)](
        q_slots,
        q_last,
        k_slots,
        k_first,
        mass,
        peak,
        tile_row_t,
        tile_rows_t,
        row_block_t,
        row_kb_t,
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
        KEY_BLOCKS=key_blocks_per_tile,
        PEAK=config.max_mix > 0,
        # Past TILE x TILE scores a program (one-token composites: 128 x 128), 8 warps keep
        # the default tile's registers per thread (chosen so, not timed against 4).
        num_warps=4 if scores_per_tile <= TILE * TILE else 8,
    )
    return mix_peak(mass, peak, config.max_mix)
