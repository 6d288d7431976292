"""Block-sparse prefill attention run by FA3's paged-KV kernel, driven by a ``BlockPlan``.

FA3 reads keys through a block table, one table row per sequence. Making every plan row
(one request's query block) a sequence of its own, whose table lists the pages of the key
blocks the plan selected, turns block-sparse attention into plain causal varlen attention
over "virtual" sequences: the selected blocks ascend and the diagonal block comes last, so
FA3's bottom-right causal alignment masks exactly the diagonal block's future keys.
One call per selection group (its query heads and their KV head); the plan's key blocks
must be whole pages (``block_size % page_size == 0``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import BlockPlan, PagedKV, PrefillBatch


@dataclass(frozen=True)
class VirtualSequences:
    """Plan rows as FA3 varlen sequences, per selection group ``s``:
    ``block_table[s, row]`` lists the pages of the row's selected key blocks in order,
    ``seq_lens[s, row]`` counts their keys up to the row's last query token."""

    cu_seqlens_q: Tensor  # [rows + 1] int32: the rows' query tokens are consecutive
    seq_lens: Tensor  # [H_sel, rows] int32
    block_table: Tensor  # [H_sel, rows, W * pages per block] int32
    max_seqlen_q: int
    max_seqlen_k: int


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
    if query.dtype not in (torch.float16, torch.bfloat16) or kv.key_cache.dtype != query.dtype:
        return f"FA3 takes fp16/bf16 queries and caches, got {query.dtype} and {kv.key_cache.dtype}"
    return _fa3_on(query.device)


@functools.lru_cache(maxsize=4)
def _row_extents(
    batch: PrefillBatch, block_size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(cu_seqlens_q, keys of each row's diagonal block)`` for the batch's rows, once per step."""
    ends, diagonal = [0], []
    for start, context, query in zip(
        batch.query_start[:-1], batch.context_lens, batch.query_lens, strict=True
    ):
        seq_len = context + query
        first = context // block_size
        for block in range(first, (seq_len - 1) // block_size + 1):
            row_end = min((block + 1) * block_size, seq_len)
            ends.append(start + row_end - context)
            diagonal.append(row_end - block * block_size)
    table = torch.tensor(ends + diagonal, dtype=torch.int32).to(device)
    return table[: len(ends)], table[len(ends) :]


def virtual_sequences(batch: PrefillBatch, kv: PagedKV, plan: BlockPlan) -> VirtualSequences:
    """The plan's rows as FA3 sequences (no host sync: widths come from tensor shapes)."""
    block = plan.block_size
    pages_per_block = block // kv.page_size
    cu_seqlens_q, diagonal_keys = _row_extents(batch, block, plan.counts.device)
    seq_lens = (plan.counts - 1) * block + diagonal_keys[None, :]
    request_pages = kv.block_table[plan.row_request.long()]  # [rows, max pages]
    page = plan.indices.clamp(min=0)[..., None] * pages_per_block + torch.arange(
        pages_per_block, device=plan.indices.device, dtype=plan.indices.dtype
    )  # [H_sel, rows, W, pages per block]
    page = page.flatten(2).clamp(max=request_pages.shape[1] - 1).long()
    table = torch.gather(request_pages.expand(page.shape[0], -1, -1), 2, page)
    return VirtualSequences(
        cu_seqlens_q=cu_seqlens_q,
        seq_lens=seq_lens.to(torch.int32),
        block_table=table.to(torch.int32),
        max_seqlen_q=block,
        max_seqlen_k=plan.indices.shape[-1] * block,
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
    heads = plan.heads_per_selection
    group = query.shape[1] // kv.num_kv_heads
    for s in range(plan.counts.shape[0]):
        kv_head = s * heads // group
        flash_attn_varlen_func(
            q=query[:, s * heads : (s + 1) * heads],
            k=kv.key_cache[:, :, kv_head : kv_head + 1],
            v=kv.value_cache[:, :, kv_head : kv_head + 1],
            out=out[:, s * heads : (s + 1) * heads],
            cu_seqlens_q=virtual.cu_seqlens_q,
            max_seqlen_q=virtual.max_seqlen_q,
            seqused_k=virtual.seq_lens[s],
            max_seqlen_k=virtual.max_seqlen_k,
            softmax_scale=scale,
            causal=True,
            block_table=virtual.block_table[s],
            fa_version=3,
        )
    return out
