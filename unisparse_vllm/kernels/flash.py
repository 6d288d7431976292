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

from ..core import BlockPlan, PagedKV, PrefillBatch, device_offsets


@dataclass(frozen=True)
class VirtualSequences:
    """Plan rows as FA3 varlen sequences, per selection group ``s``:
    ``block_table[s, row]`` lists the pages of the row's selected key blocks in order,
    ``seq_lens[s, row]`` counts their keys up to the row's last query token."""

    cu_seqlens_q: Tensor  # [rows + 1] int32: the rows' query tokens are consecutive
    seq_lens: Tensor  # [H_sel, rows] int32
    block_table: Tensor  # [H_sel, rows, widest row's blocks * pages per block] int32
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
    head_dim = query.shape[-1]
    if head_dim % 8 or head_dim > 256:
        return f"FA3 takes head sizes that are multiples of 8 up to 256, got {head_dim}"
    if query.dtype not in (torch.float16, torch.bfloat16) or kv.key_cache.dtype != query.dtype:
        return f"FA3 takes fp16/bf16 queries and caches, got {query.dtype} and {kv.key_cache.dtype}"
    return _fa3_on(query.device)


def virtual_sequences(batch: PrefillBatch, kv: PagedKV, plan: BlockPlan) -> VirtualSequences:
    """The plan's rows as FA3 sequences. Tables are as wide as the widest row (one host sync,
    on the prefill path only): at low density far narrower than all key blocks."""
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
    width = int(plan.counts.max())
    request_pages = kv.block_table[request]  # [rows, max pages]
    page = plan.indices[..., :width].clamp(min=0)[..., None] * pages_per_block + torch.arange(
        pages_per_block, device=plan.indices.device, dtype=plan.indices.dtype
    )  # [H_sel, rows, width, pages per block]
    page = page.flatten(2).clamp(max=request_pages.shape[1] - 1).long()
    table = torch.gather(request_pages.expand(page.shape[0], -1, -1), 2, page)
    return VirtualSequences(
        cu_seqlens_q=cu_seqlens_q.to(torch.int32),
        seq_lens=key_lens.to(torch.int32),
        block_table=table.to(torch.int32),
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
