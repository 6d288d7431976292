"""UNISPARSE on CUDA: vLLM's FlashAttention backend for everything that stays dense
(decodes, short prompts, dense layers, unsupported features), the UniSparse kernels for
long prefills.

The builder decides once per step: with no request long enough, the whole batch is plain
FlashAttention metadata (no overhead, CUDA graphs as usual); otherwise it builds
FlashAttention metadata for the leading decodes and for the prefill slice (used by dense
layers) plus the ``PrefillWork`` of the sparse path. Prefill steps run eagerly, so the host
work here is allowed; decode-only batches never reach it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from . import compat
from .common import (
    PrefillWork,
    SparsePrefillLayer,
    count_leading_decodes,
    dense_fallback_reason,
    engine_config,
    prefill_work,
    slice_requests,
    sparse_unsupported,
    warm_up_sparse_kernels,
)

compat.check_supported()
logger = logging.getLogger("vllm.unisparse")  # a child of vLLM's configured logger
_REPORTED: set[str] = set()


class UniSparseFlashBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "UNISPARSE"

    @staticmethod
    def get_impl_cls() -> type[UniSparseFlashImpl]:
        return UniSparseFlashImpl

    @staticmethod
    def get_builder_cls() -> type[UniSparseFlashBuilder]:
        return UniSparseFlashBuilder


@dataclass
class UniSparseFlashMetadata:
    num_actual_tokens: int
    dense: Any = None  # FlashAttention metadata of the whole batch when nothing is sparse
    decode: Any = None  # ... of the leading decode requests
    prefill: Any = None  # ... of the prefill requests, for layers that stay dense
    work: PrefillWork | None = None


class UniSparseFlashBuilder(FlashAttentionMetadataBuilder):
    # Full CUDA graphs for decode-only batches; batches with a prefill run eagerly.
    _cudagraph_support = AttentionCGSupport.UNIFORM_BATCH
    supports_update_block_table: bool = False

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: Any):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.min_sparse_tokens = engine_config().min_sparse_tokens
        compat.track_prompt_lengths()
        warm_up_sparse_kernels(layer_names, kv_cache_spec, vllm_config, device)
        self._init_reorder_batch_threshold(1)  # decodes first, then prefills

    def build(  # type: ignore[override]
        self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False
    ) -> UniSparseFlashMetadata:
        cm = common_attn_metadata
        decodes = count_leading_decodes(cm.query_start_loc_cpu)
        work = None
        if decodes < cm.num_reqs and sparse_unsupported(cm) is None:
            seq_lens = cm.seq_lens_cpu_upper_bound  # exact for prefill rows
            if seq_lens is None:
                seq_lens = cm.seq_lens.cpu()
            work = prefill_work(
                cm.query_start_loc_cpu,
                seq_lens,
                cm.block_table_tensor,
                decodes,
                self.min_sparse_tokens,
            )
        if work is None or work.long_requests == 0:
            dense = super().build(common_prefix_len, cm, fast_build)
            return UniSparseFlashMetadata(cm.num_actual_tokens, dense=dense)
        return UniSparseFlashMetadata(
            cm.num_actual_tokens,
            decode=self._build_dense(cm, 0, decodes) if decodes else None,
            prefill=self._build_dense(cm, decodes, cm.num_reqs),
            work=work,
        )

    def _build_dense(self, cm: Any, start: int, stop: int) -> Any:
        # fast_build skips FA3's ahead-of-time schedule: its buffer is shared by the builder,
        # so two slices built in one step would overwrite each other's.
        return super().build(0, slice_requests(cm, start, stop), fast_build=True)


class UniSparseFlashImpl(FlashAttentionImpl):
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
        attn_type: Any = "decoder",
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            num_heads,
            head_size,
            scale,
            num_kv_heads,
            alibi_slopes,
            sliding_window,
            kv_cache_dtype,
            logits_soft_cap,
            attn_type,
            kv_sharing_target_layer_name,
            sinks,
        )
        reason = dense_fallback_reason(
            alibi_slopes=alibi_slopes,
            sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap,
            sinks=sinks,
            attn_type=attn_type,
            kv_cache_dtype=kv_cache_dtype,
        )
        self.sparse: SparsePrefillLayer | None = None
        if reason is None:
            self.sparse = SparsePrefillLayer(num_heads, num_kv_heads, head_size, self.scale)
        elif reason not in _REPORTED:  # one line per reason, not one per layer
            _REPORTED.add(reason)
            logger.info("UniSparse: layers with %s run dense FlashAttention", reason)

    def forward(  # type: ignore[override]
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: UniSparseFlashMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        def dense(rows: slice, metadata: Any) -> None:
            super(UniSparseFlashImpl, self).forward(
                layer,
                query[rows],
                key[rows],
                value[rows],
                kv_cache,
                metadata,
                output[rows],
                output_scale,
                output_block_scale,
            )

        if attn_metadata is None or attn_metadata.dense is not None:
            metadata: Any = None if attn_metadata is None else attn_metadata.dense
            return super().forward(
                layer,
                query,
                key,
                value,
                kv_cache,
                metadata,
                output,
                output_scale,
                output_block_scale,
            )
        work = attn_metadata.work
        assert work is not None
        if attn_metadata.decode is not None:
            dense(slice(0, work.first_token), attn_metadata.decode)
        if self.sparse is None or self.sparse.is_dense(layer.layer_name, work):
            dense(work.token_slice, attn_metadata.prefill)
        else:
            self.sparse.forward(
                layer.layer_name,
                query,
                kv_cache,
                work,
                output,
                run_dense=lambda: dense(work.token_slice, attn_metadata.prefill),
            )
        return output
