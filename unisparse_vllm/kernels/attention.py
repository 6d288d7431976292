"""Block-sparse prefill attention over vLLM's paged KV cache, driven by a ``BlockPlan``.

One program computes one (plan row, query head): the query tokens of one query block
against the key blocks the plan selected for the head's selection group, FlashAttention
style (online softmax in fp32, exp2). The selected blocks are ascending and the diagonal
block is always the last one, so the loop has two stages, as in Triton's fused-attention
tutorial: full blocks with no mask, then the diagonal block with the causal mask.

Heads are the fastest grid axis, so the query heads of a KV group run side by side and
share each K/V block through L2; rows are launched longest first (later query blocks have
more causal blocks) to balance the tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..core import BlockPlan, PagedKV, PrefillBatch, device_offsets


@triton.jit
def _attend_block(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    block_table_row,
    key_start,
    offs_n,
    offs_d,
    q_pos,
    seq_len,
    page_size,
    stride_kpage,
    stride_ktok,
    stride_vpage,
    stride_vtok,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIAGONAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold keys ``key_start .. key_start + BLOCK_N`` into the running softmax state."""
    key_pos = key_start + offs_n
    in_seq = key_pos < seq_len
    page = tl.load(block_table_row + key_pos // page_size, mask=in_seq, other=0).to(tl.int64)
    slot = key_pos % page_size
    d_ok = offs_d[None, :] < HEAD_DIM
    k = tl.load(
        k_base + page[:, None] * stride_kpage + slot[:, None] * stride_ktok + offs_d[None, :],
        mask=in_seq[:, None] & d_ok,
        other=0.0,
    )
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if DIAGONAL:
        visible = (key_pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # Rows with nothing visible yet keep m = -inf; exp2(-inf - -inf) would be NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(scores - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_base + page[:, None] * stride_vpage + slot[:, None] * stride_vtok + offs_d[None, :],
        mask=in_seq[:, None] & d_ok,
        other=0.0,
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# The block table is vLLM's, sliced past the step's decodes: its alignment varies.
@triton.jit(
    do_not_specialize=["stride_bt", "stride_ch", "stride_ih", "stride_ir", "num_rows"],
    do_not_specialize_on_alignment=["block_table_ptr"],
)
def _sparse_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_table_ptr,
    counts_ptr,
    indices_ptr,
    row_request_ptr,
    row_block_ptr,
    query_start_ptr,
    context_len_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kpage,
    stride_ktok,
    stride_khead,
    stride_vpage,
    stride_vtok,
    stride_vhead,
    stride_bt,
    stride_ch,
    stride_ih,
    stride_ir,
    num_rows,
    page_size,
    qk_scale,
    GROUP: tl.constexpr,
    HEADS_PER_SELECTION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(0)
    row = num_rows - 1 - tl.program_id(1)  # longest rows first
    sel = head // HEADS_PER_SELECTION
    kv_head = head // GROUP

    request = tl.load(row_request_ptr + row)
    q_block = tl.load(row_block_ptr + row)
    context = tl.load(context_len_ptr + request)
    q_first = tl.load(query_start_ptr + request)
    seq_len = context + tl.load(query_start_ptr + request + 1) - q_first

    offs_m = tl.arange(0, BLOCK_SIZE)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = q_block * BLOCK_SIZE + offs_m
    q_valid = (q_pos >= context) & (q_pos < seq_len)
    q_token = (q_first + q_pos - context).to(tl.int64)
    q = tl.load(
        q_ptr + q_token[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=q_valid[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )

    k_base = k_ptr + kv_head * stride_khead
    v_base = v_ptr + kv_head * stride_vhead
    block_table_row = block_table_ptr + request * stride_bt
    m_i = tl.full([BLOCK_SIZE], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_SIZE], tl.float32)
    acc = tl.zeros([BLOCK_SIZE, BLOCK_D], tl.float32)

    count = tl.load(counts_ptr + sel * stride_ch + row)
    row_indices = indices_ptr + sel * stride_ih + row * stride_ir
    # Stage 1: selected blocks before the diagonal, whole and fully visible.
    for k in range(0, count - 1):
        key_block = tl.load(row_indices + k)
        for sub in range(0, BLOCK_SIZE, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc,
                m_i,
                l_i,
                q,
                k_base,
                v_base,
                block_table_row,
                key_block * BLOCK_SIZE + sub,
                offs_n,
                offs_d,
                q_pos,
                seq_len,
                page_size,
                stride_kpage,
                stride_ktok,
                stride_vpage,
                stride_vtok,
                qk_scale,
                HEAD_DIM,
                BLOCK_N,
                False,
                DOT_PRECISION,
            )
    # Stage 2: the diagonal block (always selected, always last), causal mask per token.
    for sub in range(0, BLOCK_SIZE, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc,
            m_i,
            l_i,
            q,
            k_base,
            v_base,
            block_table_row,
            q_block * BLOCK_SIZE + sub,
            offs_n,
            offs_d,
            q_pos,
            seq_len,
            page_size,
            stride_kpage,
            stride_ktok,
            stride_vpage,
            stride_vtok,
            qk_scale,
            HEAD_DIM,
            BLOCK_N,
            True,
            DOT_PRECISION,
        )

    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + q_token[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=q_valid[:, None] & (offs_d[None, :] < HEAD_DIM),
    )


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs (tests, references) get exact fp32 dots; Triton would use tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class LaunchConfig:
    """Tile and pipeline choices of the kernel (``benchmarks/tune_attention.py`` sweeps them)."""

    block_n: int
    num_warps: int
    num_stages: int


def default_launch(block_size: int, head_dim: int) -> LaunchConfig:
    """Measured on an H200 for head_dim 128, block 128 (benchmarks/RESULTS.md: 128-key
    tiles with 4 stages ran 1.5x faster than 64-key tiles with 2); the others are not tuned."""
    if head_dim > 128:
        return LaunchConfig(block_n=32, num_warps=8, num_stages=2)
    if block_size == 64:
        return LaunchConfig(block_n=64, num_warps=4, num_stages=3)
    return LaunchConfig(block_n=128, num_warps=8, num_stages=4)


def sparse_attention(
    query: Tensor,
    kv: PagedKV,
    batch: PrefillBatch,
    plan: BlockPlan,
    scale: float,
    out: Tensor | None = None,
    *,
    launch: LaunchConfig | None = None,
) -> Tensor:
    """Same contract as ``core.sparse_attention`` for a paged cache; writes ``out`` in place."""
    out = torch.empty_like(query) if out is None else out
    num_heads, head_dim = query.shape[1], query.shape[2]
    group = num_heads // kv.num_kv_heads
    query_start, context_lens = device_offsets(batch, query.device)
    key_cache, value_cache = kv.key_cache, kv.value_cache
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("head_dim must be the contiguous axis of query and the KV cache")
    launch = launch or default_launch(plan.block_size, head_dim)
    grid = (num_heads, plan.num_rows)
    _sparse_attention_kernel[grid](
        query,
        key_cache,
        value_cache,
        out,
        kv.block_table,
        plan.counts,
        plan.indices,
        plan.row_request,
        plan.row_block,
        query_start,
        context_lens,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        kv.block_table.stride(0),
        plan.counts.stride(0),
        plan.indices.stride(0),
        plan.indices.stride(1),
        plan.num_rows,
        kv.page_size,
        scale * 1.4426950408889634,  # log2(e): exp2 softmax
        GROUP=group,
        HEADS_PER_SELECTION=plan.heads_per_selection,
        BLOCK_SIZE=plan.block_size,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_N=launch.block_n,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    return out
