"""UNISPARSE on vLLM's CPU platform (what CI runs end to end).

Owns its cache format: the logical ``[num_pages, Hkv, page, 2*d]`` view in identity layout,
written through ``slot_mapping`` by an index-put (CPU_ATTN's ISA-packed cache is not
readable by plain PyTorch). Decodes and prefills both go through ``SparsePrefillLayer``:
decodes and short prompts become dense rows of the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)

from .. import core
from . import compat
from .common import PrefillWork, SparsePrefillLayer, dense_fallback_reason, prefill_work

compat.check_supported()


class UniSparseCPUBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "UNISPARSE"

    @staticmethod
    def get_impl_cls() -> type[UniSparseCPUImpl]:
        return UniSparseCPUImpl

    @staticmethod
    def get_builder_cls() -> type[UniSparseCPUMetadataBuilder]:
        return UniSparseCPUMetadataBuilder

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == "decoder"

    @classmethod
    def supported_kv_cache_layouts(cls) -> Any:
        from vllm.v1.kv_cache_interface import KVCacheLayout

        return (KVCacheLayout.LBHNC,)


@dataclass
class UniSparseCPUMetadata:
    num_actual_tokens: int
    work: PrefillWork


class UniSparseCPUMetadataBuilder(AttentionMetadataBuilder[UniSparseCPUMetadata]):
    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: Any):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from .common import engine_config

        self.min_sparse_tokens = engine_config().min_sparse_tokens
        compat.track_prompt_lengths()

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> UniSparseCPUMetadata:
        cm = common_attn_metadata
        work = prefill_work(
            cm.query_start_loc_cpu,
            cm.seq_lens.cpu(),
            cm.block_table_tensor,
            0,
            self.min_sparse_tokens,
        )
        assert work is not None, "vLLM built attention metadata for an empty batch"
        return UniSparseCPUMetadata(num_actual_tokens=cm.num_actual_tokens, work=work)


class UniSparseCPUImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = "decoder",
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        reason = dense_fallback_reason(
            alibi_slopes=alibi_slopes,
            sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap,
            sinks=sinks,
            attn_type=attn_type,
            kv_cache_dtype=kv_cache_dtype,
        )
        if reason is not None:
            # On the CPU there is no dense backend of ours to fall back to for these.
            raise NotImplementedError(
                f"UNISPARSE on the CPU supports decoder full attention only; this layer has "
                f"{reason}. Use the default CPU backend for this model."
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads
        self.scale = float(scale)
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.sparse = SparsePrefillLayer(num_heads, num_kv_heads, head_size, self.scale)

    def do_kv_cache_update(
        self,
        layer: Any,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        page_size = kv_cache.shape[2]
        valid = slot_mapping >= 0  # padded tokens carry -1
        slots = slot_mapping[valid].long()
        pages, offsets = slots // page_size, slots % page_size
        kv_cache[pages, :, offsets, : self.head_size] = key[: len(valid)][valid].to(kv_cache.dtype)
        kv_cache[pages, :, offsets, self.head_size :] = value[: len(valid)][valid].to(
            kv_cache.dtype
        )

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: UniSparseCPUMetadata | None,
        output: torch.Tensor | None = None,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert output is not None, "vLLM passes the output buffer"
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("UNISPARSE does not fuse output quantization")
        if attn_metadata is None:  # profiling run
            return output
        work = attn_metadata.work

        def run_dense() -> None:
            key_cache, value_cache = compat.split_kv_cache(kv_cache, self.head_size)
            rows = work.token_slice
            core.dense_attention(
                query[rows].view(-1, self.num_heads, self.head_size),
                core.PagedKV(key_cache, value_cache, work.block_table),
                work.batch,
                self.scale,
                out=output[rows].view(-1, self.num_heads, self.head_size),
            )

        if self.sparse.is_dense(layer.layer_name, work):
            run_dense()
        else:
            self.sparse.forward(layer.layer_name, query, kv_cache, work, output, run_dense)
        return output
