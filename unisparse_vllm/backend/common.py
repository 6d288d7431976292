"""What the CPU and CUDA backends share: the prefill part of a batch, and one layer's
sparse prefill (config resolved once, then plan + attend through ``kernels``)."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .. import core, kernels
from ..config import LayerBudget, UniSparseConfig, config_from_vllm
from ..core import BlockPlan, PagedKV, PrefillBatch
from . import compat
from .compat import split_kv_cache
from .stats import STATS

logger = logging.getLogger("vllm.unisparse")
_REPORTED_ERRORS: set[tuple[str, str]] = set()  # (type, message) already logged here
_LOGGED_ATTENTION: set[str] = set()  # attention implementations already logged here


@dataclass(frozen=True)
class PrefillWork:
    """The requests of a step that the sparse path handles, decided once per step.

    Requests ``first_request ..`` of the vLLM batch, whose tokens start at ``first_token``
    (vLLM orders decodes first). ``block_table`` holds their rows of vLLM's block table.
    """

    first_request: int
    first_token: int
    batch: PrefillBatch
    block_table: Tensor
    # Each request's prompt length where the model runner told it; None: each chunk's end
    # stands for its prompt's end (compat.prompt_lengths).
    prompt_lens: tuple[int, ...] | None
    long_requests: int  # prompts of at least min_sparse_tokens (those that get estimated)
    # Prefill tokens (decodes excluded: the CPU backend's batches hold them too), and per
    # request those of a long prompt: what the counters report per layer as the sparse
    # path's tokens, where the request's budget there is not dense.
    prefill_tokens: int
    long_prefill_tokens: tuple[int, ...]

    @property
    def prompt_ends(self) -> tuple[int, ...]:
        """Each request's prompt length, or its chunk's end where that is not known."""
        return self.prompt_lens or self.batch.seq_lens

    @property
    def token_slice(self) -> slice:
        return slice(self.first_token, self.first_token + self.batch.num_tokens)


def count_leading_decodes(query_start_loc_cpu: Tensor) -> int:
    """Requests with one query token at the front of the batch (vLLM reorders them there)."""
    query_lens = (query_start_loc_cpu[1:] - query_start_loc_cpu[:-1]).tolist()
    decodes = 0
    while decodes < len(query_lens) and query_lens[decodes] <= 1:
        decodes += 1
    return decodes


def prefill_work(
    query_start_loc_cpu: Tensor,
    seq_lens_cpu: Tensor,
    block_table: Tensor,
    first_request: int,
    min_sparse_tokens: int,
) -> PrefillWork | None:
    """Requests ``first_request ..`` as a ``PrefillBatch``; None when there are none. Their
    prompt lengths come from the model runner where it tells them (``compat``)."""
    starts = query_start_loc_cpu.tolist()
    seq_lens = seq_lens_cpu.tolist()[first_request:]
    num_requests = len(seq_lens)
    query_lens = [
        starts[first_request + r + 1] - starts[first_request + r] for r in range(num_requests)
    ]
    if not query_lens:
        return None
    prompt_lens = compat.prompt_lengths(first_request, query_lens, seq_lens)
    ends = prompt_lens or seq_lens  # as PrefillWork.prompt_ends
    context_lens = [s - n for s, n in zip(seq_lens, query_lens, strict=True)]
    return PrefillWork(
        first_request=first_request,
        first_token=starts[first_request],
        batch=PrefillBatch.from_lens(query_lens, context_lens),
        block_table=block_table[first_request : first_request + num_requests],
        prompt_lens=prompt_lens,
        long_requests=sum(e >= min_sparse_tokens for e in ends),
        prefill_tokens=sum(n for n in query_lens if n > 1),
        long_prefill_tokens=tuple(
            n if n > 1 and e >= min_sparse_tokens else 0
            for n, e in zip(query_lens, ends, strict=True)
        ),
    )


def layer_index(layer_name: str) -> int:
    """``model.layers.12.self_attn.attn`` -> 12 (the first number in the dotted name)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", layer_name)
    if match is None:
        raise ValueError(f"cannot find a layer index in layer name {layer_name!r}")
    return int(match.group(1))


def engine_config() -> UniSparseConfig:
    """The config of the engine being built (call from an impl's or builder's ``__init__``)."""
    from vllm.config import get_current_vllm_config

    vllm_config = get_current_vllm_config()
    model_config = vllm_config.model_config
    return config_from_vllm(
        vllm_config.additional_config,  # type: ignore[arg-type]
        getattr(model_config, "hf_config", None),
        getattr(model_config, "model", None),
    )


_WARMED_UP: set[tuple] = set()  # warm-up keys already compiled in this process


def warm_up_sparse_kernels(
    layer_names: list[str], kv_cache_spec: Any, vllm_config: Any, device: Any
) -> None:
    """Compile the sparse prefill's Triton kernels for these layers now, at engine start
    (``kernels.warmup``), rather than inside the first long request. Call from a metadata
    builder's ``__init__``. A failure is logged and left to the first request (whose sparse
    path then falls back to dense, or raises with ``on_error: raise``)."""
    import torch

    if kernels.choice() == "reference" or torch.device(device).type != "cuda":
        return
    dtype = kv_cache_spec.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return  # the sparse path runs on fp16/bf16 caches only (dense_fallback_reason)
    config = engine_config()
    model_config = vllm_config.model_config
    num_heads = model_config.get_num_attention_heads(vllm_config.parallel_config)
    budgets = [b for name in layer_names for b in config.tier_budgets(layer_index(name))]
    key = (
        str(device),  # Triton keeps its compiled kernels per device
        num_heads,
        kv_cache_spec.num_kv_heads,
        kv_cache_spec.head_size,
        dtype,
        kv_cache_spec.block_size,
        model_config.max_model_len,
        config.model_dump_json(),
        tuple(b.model_dump_json() for b in budgets),
    )
    if key in _WARMED_UP:
        return
    _WARMED_UP.add(key)
    from ..kernels.warmup import warm_up

    start = time.perf_counter()
    try:
        steps = warm_up(
            config,
            budgets,
            num_heads=num_heads,
            num_kv_heads=kv_cache_spec.num_kv_heads,
            head_dim=kv_cache_spec.head_size,
            dtype=dtype,
            page_size=kv_cache_spec.block_size,
            max_seq_len=model_config.max_model_len,
            device=device,
        )
    except Exception:
        logger.warning(
            "UniSparse: compiling the sparse prefill kernels at start-up failed; the first "
            "long request will try again",
            exc_info=True,
        )
        return
    if steps:
        logger.info(
            "UniSparse: sparse prefill kernels compiled for %d budget(s) in %.1f s",
            steps,
            time.perf_counter() - start,
        )


class SparsePrefillLayer:
    """One attention layer's UniSparse prefill. Built in the impl's ``__init__`` (a bad config
    stops start-up there); the layer's budgets (one per length tier) are resolved on its
    first forward, when vLLM tells the layer's name, and kept."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float) -> None:
        self.config = engine_config()
        self.config.heads_per_selection(num_heads, num_kv_heads)  # c_h must fit this model
        kernels.choice()  # a bad UNISPARSE_KERNELS stops start-up
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self._budgets: dict[str, tuple[LayerBudget, ...]] = {}

    def budgets(self, layer_name: str, work: PrefillWork) -> tuple[LayerBudget, ...]:
        """The layer's budget for each request of ``work``, by its prompt's length tier."""
        tiers = self._budgets.get(layer_name)
        if tiers is None:
            tiers = self.config.tier_budgets(layer_index(layer_name))
            self._budgets[layer_name] = tiers
        return tuple(tiers[self.config.tier_of(end)] for end in work.prompt_ends)

    def is_dense(self, layer_name: str, work: PrefillWork) -> bool:
        """Nothing to estimate: no request long enough, or the layer is dense for each."""
        long_enough = self.config.min_sparse_tokens
        return all(
            budget.dense or end < long_enough
            for budget, end in zip(self.budgets(layer_name, work), work.prompt_ends, strict=True)
        )

    def forward(
        self,
        layer_name: str,
        query: Tensor,
        kv_cache: Tensor,
        work: PrefillWork,
        output: Tensor,
        run_dense: Callable[[], None],
    ) -> None:
        """Sparse prefill of ``work``'s tokens of ``query`` into the same rows of ``output``,
        or ``run_dense()`` when the plan selects more than ``dense_above_density``."""
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        kv = PagedKV(key_cache, value_cache, work.block_table)
        rows = work.token_slice
        q = query[rows].view(-1, self.num_heads, self.head_size)
        out = output[rows].view(-1, self.num_heads, self.head_size)
        budgets = self.budgets(layer_name, work)
        selected: int | Tensor = 0
        causal = 0
        try:
            plan = kernels.plan_prefill(
                q,
                kv,
                work.batch,
                self.config,
                budgets,
                scale=self.scale,
                prompt_lens=work.prompt_lens,
            )
            # The selected count stays on the device (counters add it there): reading it would
            # make the host wait for the GPU at every layer. Only a density check reads it.
            selected = plan.selected_blocks()
            causal = core.causal_row_blocks(work.batch, plan.block_size) * plan.counts.shape[0]
            implementation = kernels.attention_implementation(q, kv, work.batch, plan)
            _log_attention_once(implementation, q, kv, plan)
            threshold = kernels.dense_above_density(implementation, self.config)
            fallback = threshold is not None and int(selected) > threshold * causal
            if not fallback:
                kernels.sparse_attention(q, kv, work.batch, plan, self.scale, out=out)
        except Exception as err:
            # The dense kernel recomputes every row of the step, so the request goes on
            # (a CUDA fault would fail it too and stop the engine, as it must).
            if self.config.on_error == "raise":
                raise
            self._report_error(layer_name, err)
            fallback, causal = True, 0
        if fallback:
            run_dense()
        sparse_tokens = 0
        if not fallback:
            sparse_tokens = sum(
                tokens
                for tokens, budget in zip(work.long_prefill_tokens, budgets, strict=True)
                if not budget.dense
            )
        STATS.record(
            layer_name,
            sparse_tokens=sparse_tokens,
            dense_tokens=work.prefill_tokens - sparse_tokens,
            selected=causal if fallback else selected,
            causal=causal,
            prompt_length_unknown_tokens=work.prefill_tokens if work.prompt_lens is None else 0,
        )

    def _report_error(self, layer_name: str, err: Exception) -> None:
        """Count every sparse-path error; log each kind once per process, with its traceback
        (a persistent failure would otherwise log every layer of every step)."""
        STATS.record_error(layer_name)
        kind = (type(err).__name__, str(err)[:200])
        if kind not in _REPORTED_ERRORS:
            _REPORTED_ERRORS.add(kind)
            logger.exception(
                "UniSparse: the sparse path of %s failed; this step runs densely "
                "(set on_error: raise to stop instead; later errors of this kind are only "
                "counted, in unisparse:sparse_errors_total)",
                layer_name,
            )


def _log_attention_once(implementation: str, query: Tensor, kv: PagedKV, plan: BlockPlan) -> None:
    """Say once per process which attention runs the sparse steps (FA3 is ~2x faster than
    the Triton kernel: an operator should see when it is not available, and why)."""
    if implementation in _LOGGED_ATTENTION:
        return
    _LOGGED_ATTENTION.add(implementation)
    if implementation == "flash":
        logger.info("UniSparse: sparse prefill attention runs on FA3 (virtual sequences)")
    else:
        from ..kernels.flash import unusable_reason

        logger.info(
            "UniSparse: sparse prefill attention runs on the %s kernel (FA3 not used: %s)",
            implementation,
            unusable_reason(query, kv, plan) or "the step is too small for its per-call cost",
        )


def dense_fallback_reason(
    *,
    alibi_slopes: Any,
    sliding_window: Any,
    logits_soft_cap: Any,
    sinks: Any,
    attn_type: Any,
    kv_cache_dtype: str,
) -> str | None:
    """Why a layer cannot take the sparse path (it then runs densely), or None."""
    if attn_type != "decoder":  # vLLM's AttentionType is a str enum
        return f"attention type {attn_type}"
    if sliding_window is not None:
        return f"sliding window {sliding_window}"
    if alibi_slopes is not None:
        return "ALiBi"
    if logits_soft_cap:
        return f"logits soft cap {logits_soft_cap}"
    if sinks is not None:
        return "attention sinks"
    if kv_cache_dtype not in ("auto", "bfloat16", "float16", "float32"):
        return f"kv cache dtype {kv_cache_dtype}"
    return None


# CommonAttentionMetadata fields, by what a request slice does to them. Fields not named
# here are batch-wide and kept; features whose fields are reset make the batch dense
# (see ``sparse_unsupported``).
_PER_REQUEST = {
    "seq_lens",
    "block_table_tensor",
    "is_prefilling",
    "seq_lens_cpu_upper_bound",
    "_seq_lens_cpu",
    "_num_computed_tokens_cpu",
    "req_idx",
}
_PER_TOKEN = {"slot_mapping", "positions"}
_RESET = {
    "logits_indices_padded",
    "num_logits_indices",
    "max_logits_per_req",
    "_num_computed_tokens_cache",
    "_token_to_req_indices_cache",
}


def sparse_unsupported(cm: Any) -> str | None:
    """A batch feature the sparse path does not implement (the batch then runs densely)."""
    if cm.causal is not True:
        return "non-causal or per-request causal attention"
    for name in ("mm_req_doc_ranges", "dcp_local_seq_lens", "encoder_seq_lens", "rswa_prefix_lens"):
        if getattr(cm, name, None):
            return name
    return None


def slice_requests(cm: Any, start: int, stop: int) -> Any:
    """``CommonAttentionMetadata`` of requests ``start .. stop-1`` (token offsets rebased)."""
    starts_cpu = cm.query_start_loc_cpu[start : stop + 1]
    first, last = int(starts_cpu[0]), int(starts_cpu[-1])
    changes: dict[str, Any] = {
        "query_start_loc": cm.query_start_loc[start : stop + 1] - cm.query_start_loc[start],
        "query_start_loc_cpu": starts_cpu - starts_cpu[0],
        "num_reqs": stop - start,
        "num_actual_tokens": last - first,
        "max_query_len": int((starts_cpu[1:] - starts_cpu[:-1]).max()),
    }
    for field in dataclasses.fields(cm):
        value = getattr(cm, field.name)
        if value is None or field.name in changes:
            continue
        if field.name in _PER_REQUEST:
            changes[field.name] = value[start:stop]
        elif field.name in _PER_TOKEN:
            changes[field.name] = value[first:last]
        elif field.name in _RESET:
            changes[field.name] = None
    upper = changes.get("seq_lens_cpu_upper_bound")
    if upper is not None:
        changes["max_seq_len"] = int(upper.max())
    return dataclasses.replace(cm, **changes)
