"""Everything that differs between the vLLM versions we support, in one place.

0.26.0 (CUDA build, the GPU machine) and 0.32.x (CPU build, CI). Differences handled:
- adding a member to ``AttentionBackendEnum``: 0.32 has ``register``; 0.26 does not;
- the KV cache spec: 0.26 asks backends for ``get_kv_cache_shape``; 0.32 hands each layer a
  logical ``[num_blocks, Hkv, page, 2*d]`` view. Both give that same logical view to the impl.
Alike in both, and read here only: the model runner's input batch (each request's prompt
length, which attention metadata does not carry).
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("vllm.unisparse")
SUPPORTED = ((0, 26), (0, 32))  # inclusive range of (major, minor)
SUPPORTED_TEXT = "vLLM 0.26.x to 0.32.x"


def vllm_version() -> tuple[int, int]:
    import vllm

    parts = vllm.__version__.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def check_supported() -> None:
    """Raise at start-up, naming the supported range, on any other vLLM version."""
    import vllm

    if not SUPPORTED[0] <= vllm_version() <= SUPPORTED[1]:
        raise RuntimeError(
            f"unisparse-vllm supports {SUPPORTED_TEXT}; this is vLLM {vllm.__version__}"
        )


def add_enum_member(enum_cls: Any, name: str, class_path: str) -> Any:
    """Add ``name -> class_path`` to vLLM's ``AttentionBackendEnum`` (idempotent)."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    if hasattr(enum_cls, "register"):  # 0.32
        return enum_cls.register(name, class_path)
    # 0.26: the same steps 0.32's register() takes.
    member = object.__new__(enum_cls)
    member._name_ = name
    member._value_ = class_path
    setattr(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[class_path] = member
    enum_cls._member_names_.append(name)
    return member


def split_kv_cache(kv_cache: Any, head_size: int) -> tuple[Any, Any]:
    """The per-layer logical cache ``[num_pages, Hkv, page, 2*d]`` as key and value views
    ``[num_pages, page, Hkv, d]`` (what ``core.PagedKV`` and the kernels read)."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


def _no_runner() -> Any:
    return None


_runner: Callable[[], Any] = _no_runner  # the model runner building this step's metadata


def track_prompt_lengths() -> None:
    """Let metadata builders read each request's prompt length (``prompt_lengths``).

    vLLM's attention metadata carries the tokens so far, not the prompt's length; the model
    runner's input batch has it (``num_prompt_tokens``, in batch order), in 0.26 and 0.32.
    Wraps the runner's ``_build_attention_metadata``, which calls the builders, to note the
    runner. Call from a builder's ``__init__``: the runner's module is loaded by then, and a
    process that never builds UNISPARSE metadata is left untouched. Idempotent."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # CPUModelRunner inherits it

    original = GPUModelRunner._build_attention_metadata
    if getattr(original, "_unisparse_tracked", False):
        return

    @functools.wraps(original)
    def _build_attention_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
        global _runner
        _runner = weakref.ref(self)
        return original(self, *args, **kwargs)

    _build_attention_metadata._unisparse_tracked = True  # type: ignore[attr-defined]
    GPUModelRunner._build_attention_metadata = _build_attention_metadata  # type: ignore[method-assign]


def prompt_lengths(
    first_request: int, query_lens: Sequence[int], seq_lens: Sequence[int]
) -> tuple[int, ...] | None:
    """The prompt length of requests ``first_request ..`` of the step being built, or None:
    no runner noted, or its rows are not these requests (its computed tokens + this step's
    != their sequence lengths). Callers then take each chunk's end for its prompt's end."""
    batch = getattr(_runner(), "input_batch", None)
    if batch is None:
        return None
    rows = slice(first_request, first_request + len(seq_lens))
    try:
        prompts = batch.num_prompt_tokens[rows].tolist()
        computed = batch.num_computed_tokens_cpu[rows].tolist()
    except AttributeError as err:
        _report_unknown_once(f"the input batch has no {err.name}")
        return None
    if [c + n for c, n in zip(computed, query_lens, strict=False)] != list(seq_lens):
        _report_unknown_once(
            f"rows {first_request}..: computed {computed} + scheduled {list(query_lens)} "
            f"!= sequence lengths {list(seq_lens)} (prompts {prompts})"
        )
        return None
    return tuple(int(p) for p in prompts)


def _report_unknown_once(why: str) -> None:
    """Say the first time a step's prompt lengths cannot be read, and why (the counter
    ``unisparse:prompt_length_unknown_tokens`` says how often)."""
    global _reported_unknown
    if _reported_unknown:
        return
    _reported_unknown = True
    logger.info(
        "UniSparse: prompt lengths unknown for a step (%s); its chunks are routed by their "
        "ends, as if each ended its prompt",
        why,
    )


_reported_unknown = False
