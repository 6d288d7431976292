"""Block-sparse prefill attention run by FA3's paged-KV kernel, driven by a ``BlockPlan``.

FA3 reads keys through a block table, one table row per sequence. Making every plan row
(one request's query block) a sequence of its own, whose table lists the pages of the key
blocks the plan selected, turns block-sparse attention into plain causal varlen attention
over "virtual" sequences: the selected blocks ascend and the diagonal block comes last, so
FA3's bottom-right causal alignment masks exactly the diagonal block's future keys.
One call per KV head: where a KV head's query heads select apart (``c_h`` below the group),
their queries are laid out one selection head after the other (``pack_queries``) and each
(selection head, row) is a sequence of that call. The plan's key blocks must be whole pages
(``block_size % page_size == 0``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..core import BlockPlan, PagedKV, PrefillBatch, device_offsets, num_key_blocks


@dataclass(frozen=True)
class VirtualSequences:
    """Plan rows as FA3 varlen sequences, one FA3 call per KV head. A call's sequences are the
    rows of that KV head's selection heads, one selection head after the other, over queries
    laid out the same way (``pack_queries``): ``block_table[h, i]`` lists the pages of
    sequence ``i``'s selected key blocks in order, ``seq_lens[h, i]`` counts their keys up to
    the row's last query token."""

    cu_seqlens_q: Tensor  # [selections per KV head * rows + 1] int32
    seq_lens: Tensor  # [KV heads, selections per KV head * rows] int32
    block_table: Tensor  # [KV heads, selections per KV head * rows, width * pages per block]
    selections_per_kv_head: int
    max_seqlen_q: int
    max_seqlen_k: int


def pack_queries(heads: Tensor, selections: int) -> Tensor:
    """One KV head's query heads ``[tokens, group, head_dim]`` as its FA3 call takes them:
    ``[selections * tokens, group / selections, head_dim]``, one selection head's tokens
    after the other's (a view when the whole group is one selection)."""
    if selections == 1:
        return heads
    tokens, group, head_dim = heads.shape
    per_selection = heads.unflatten(1, (selections, group // selections)).transpose(0, 1)
    return per_selection.reshape(selections * tokens, group // selections, head_dim)


def unpack_queries(packed: Tensor, selections: int) -> Tensor:
    """``pack_queries`` undone: ``[tokens, group, head_dim]``."""
    if selections == 1:
        return packed
    rows, heads, head_dim = packed.shape
    tokens = rows // selections
    return packed.view(selections, tokens, heads, head_dim).transpose(0, 1).flatten(1, 2)


@functools.lru_cache(maxsize=8)
def _fa3_on(device: torch.device) -> str | None:
    """Why vLLM's FA3 cannot run on ``device`` (``None``: it can), checked once per device."""
    if device.type != "cuda":
        return f"FA3 runs on CUDA devices, not {device.type}"
    try:
        from vllm.vllm_flash_attn import fa_version_unsupported_reason, is_fa_version_supported
    except ImportError as err:
        return f"vLLM's FA3 build is not importable ({err})"
    with torch.cuda.device(device):
        return None if is_fa_version_supported(3) else fa_version_unsupported_reason(3)


def unusable_reason(query: Tensor, kv: PagedKV, plan: BlockPlan) -> str | None:
    """Why FA3 cannot run this plan (``None``: it can)."""
    if plan.block_size % kv.page_size:
        return f"block_size {plan.block_size} is not a multiple of the KV page size {kv.page_size}"
    head_dim = query.shape[-1]
    if head_dim % 8 or head_dim > 256:
        return f"FA3 takes head sizes that are multiples of 8 up to 256, got {head_dim}"
    if query.dtype not in (torch.float16, torch.bfloat16) or kv.key_cache.dtype != query.dtype:
        return f"FA3 takes fp16/bf16 queries and caches, got {query.dtype} and {kv.key_cache.dtype}"
    return _fa3_on(query.device)


@triton.jit(
    do_not_specialize=[
        "stride_ch",
        "stride_ih",
        "stride_ir",
        "stride_bt",
        "stride_th",
        "stride_tr",
    ],
    do_not_specialize_on_alignment=["block_table_ptr"],
)
def _virtual_tables_kernel(
    counts_ptr,
    indices_ptr,
    row_request_ptr,
    block_table_ptr,
    table_ptr,
    stride_ch,
    stride_ih,
    stride_ir,
    stride_bt,
    stride_th,
    stride_tr,
    pages_per_request,
    PAGES_PER_BLOCK: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """One program per (selection head, row): the pages of the row's selected key blocks,
    in order, into the row's table (FA3 reads a sequence's table up to its ``seqused_k``)."""
    s = tl.program_id(0)
    row = tl.program_id(1)
    count = tl.load(counts_ptr + s * stride_ch + row)
    request_pages = block_table_ptr + tl.load(row_request_ptr + row).to(tl.int64) * stride_bt
    table_row = table_ptr + s * stride_th + row.to(tl.int64) * stride_tr
    offs = tl.arange(0, BLOCK_J)
    for start in range(0, count, BLOCK_J):
        j = start + offs
        selected = j < count
        key_block = tl.load(indices_ptr + s * stride_ih + row * stride_ir + j, mask=selected)
        for p in tl.static_range(PAGES_PER_BLOCK):
            # The last key block of a request may own fewer pages than a whole block.
            column = tl.minimum(key_block * PAGES_PER_BLOCK + p, pages_per_request - 1)
            page = tl.load(request_pages + column, mask=selected)
            tl.store(table_row + j * PAGES_PER_BLOCK + p, page, mask=selected)


def virtual_sequences(batch: PrefillBatch, kv: PagedKV, plan: BlockPlan) -> VirtualSequences:
    """The plan's rows as FA3 sequences. Tables are as wide as the batch's widest causal row
    (a host integer: reading the widest selected row would make the host wait for the
    GPU); only the selected pages are written, so the cost follows the selection."""
    block = plan.block_size
    pages_per_block = block // kv.page_size
    query_start, context_lens = device_offsets(batch, plan.counts.device)
    request = plan.row_request.long()
    seq_lens = (context_lens + query_start[1:] - query_start[:-1])[request]
    block_start = plan.row_block * block
    row_end = torch.minimum(block_start + block, seq_lens)  # past the row's last query token
    # Rows run in token order, so each row's queries start where the previous row's end.
    cu_seqlens_q = torch.cat(
        [query_start[:1], query_start[request] + row_end - context_lens[request]]
    )
    key_lens = (plan.counts - 1) * block + (row_end - block_start)[None, :]
    num_sel, rows = plan.counts.shape
    selections = num_sel // kv.num_kv_heads  # selection heads are ordered by KV head
    # Each selection head's copy of the queries follows the previous one's.
    copies = batch.num_tokens * torch.arange(selections, device=cu_seqlens_q.device)
    cu_seqlens_q = torch.cat(
        [cu_seqlens_q[:1], (cu_seqlens_q[None, 1:] + copies[:, None]).flatten()]
    )
    width = max(num_key_blocks(s, block) for s in batch.seq_lens)
    # Zeros past the selected pages: FA3 should not read them, but if a tile's loads run
    # ahead, page 0 is memory of the cache, not an address from uninitialized memory.
    table = torch.zeros(
        num_sel, rows, width * pages_per_block, dtype=torch.int32, device=plan.counts.device
    )
    block_table = kv.block_table
    assert block_table.stride(1) == 1, "the kernel walks a request's pages contiguously"
    _virtual_tables_kernel[(num_sel, rows)](
        plan.counts,
        plan.indices,
        plan.row_request,
        block_table,
        table,
        plan.counts.stride(0),
        plan.indices.stride(0),
        plan.indices.stride(1),
        block_table.stride(0),
        table.stride(0),
        table.stride(1),
        block_table.shape[1],
        PAGES_PER_BLOCK=pages_per_block,
        BLOCK_J=64,
    )
    return VirtualSequences(
        cu_seqlens_q=cu_seqlens_q.to(torch.int32),
        seq_lens=key_lens.to(torch.int32).view(kv.num_kv_heads, selections * rows),
        block_table=table.view(kv.num_kv_heads, selections * rows, -1),
        selections_per_kv_head=selections,
        max_seqlen_q=block,
        max_seqlen_k=width * block,
    )


def sparse_attention(
    query: Tensor,
    kv: PagedKV,
    batch: PrefillBatch,
    plan: BlockPlan,
    scale: float,
    out: Tensor | None = None,
) -> Tensor:
    """Same contract as ``core.sparse_attention`` for a paged cache; writes ``out`` in place."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    out = torch.empty_like(query) if out is None else out
    virtual = virtual_sequences(batch, kv, plan)
    selections = virtual.selections_per_kv_head
    group = query.shape[1] // kv.num_kv_heads
    # One call per KV head, not per selection head: each call costs ~0.1 ms of host time,
    # and with a selection per query head (Qwen's profile: 14) that time was the step's.
    for kv_head in range(kv.num_kv_heads):
        heads = slice(kv_head * group, (kv_head + 1) * group)
        packed_query = pack_queries(query[:, heads], selections)
        # FA3 writes into out where the layout is the same, else into a copy put back below
        packed_out = out[:, heads] if selections == 1 else torch.empty_like(packed_query)
        flash_attn_varlen_func(
            q=packed_query,
            k=kv.key_cache[:, :, kv_head : kv_head + 1],
            v=kv.value_cache[:, :, kv_head : kv_head + 1],
            out=packed_out,
            cu_seqlens_q=virtual.cu_seqlens_q,
            max_seqlen_q=virtual.max_seqlen_q,
            seqused_k=virtual.seq_lens[kv_head],
            max_seqlen_k=virtual.max_seqlen_k,
            softmax_scale=scale,
            causal=True,
            block_table=virtual.block_table[kv_head],
            fa_version=3,
        )
        if selections > 1:
            out[:, heads] = unpack_queries(packed_out, selections)
    return out
