"""Everything that differs between the vLLM versions we support, in one place.

0.26.0 (CUDA build, the GPU machine) and 0.32.x (CPU build, CI). Differences handled:
- adding a member to ``AttentionBackendEnum``: 0.32 has ``register``; 0.26 does not;
- the KV cache spec: 0.26 asks backends for ``get_kv_cache_shape``; 0.32 hands each layer a
  logical ``[num_blocks, Hkv, page, 2*d]`` view. Both give that same logical view to the impl.
Read here only: each request's prompt length, which attention metadata does not carry,
from whichever model runner builds the step (the first runner, which the CPU build uses,
or the V2 runner, which 0.26 ran on the H200; both exist in 0.26 and 0.32).
"""

from __future__ import annotations

import functools
import logging
import sys
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


# The step being built, as the model runner noted it: a function giving, per request in
# batch order, where its prompt ends and how many of its tokens were computed before the step.
_step_rows: Callable[[], tuple[Any, Any]] | None = None


def _rows_of_runner_v1(runner: Any, *args: Any, **kwargs: Any) -> Callable[[], tuple[Any, Any]]:
    """vLLM's first model runner keeps one input batch (numpy rows, updated in place)."""
    ref: Callable[[], Any] = weakref.ref(runner)  # the engine may go; this module stays
    return lambda: (ref().input_batch.num_prompt_tokens, ref().input_batch.num_computed_tokens_cpu)


def _rows_of_runner_v2(
    runner: Any, input_batch: Any, *args: Any, **kwargs: Any
) -> Callable[[], tuple[Any, Any]]:
    """The V2 model runner (what vLLM 0.26 ran on the H200) makes an input batch per step.
    Its ``prefill_len`` is the prompt, plus the outputs a request resumed after preemption
    recomputes: the end of what is prefilled."""
    ref: Callable[[], Any] = weakref.ref(input_batch)
    return lambda: (ref().prefill_len_np, ref().num_computed_tokens_np)


# (module, runner class, the method that builds a step's attention metadata, its rows)
_RUNNERS = (
    (
        "vllm.v1.worker.gpu_model_runner",
        "GPUModelRunner",
        "_build_attention_metadata",
        _rows_of_runner_v1,
    ),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "prepare_attn", _rows_of_runner_v2),
)


def track_prompt_lengths() -> None:
    """Let metadata builders read each request's prompt length (``prompt_lengths``).

    vLLM's attention metadata carries the tokens so far, not the prompt's length; the model
    runner has it, in batch order, in 0.26 and 0.32. Wraps, in each runner whose module is
    loaded, the method that starts building a step's attention metadata, to note the step's
    rows (the first runner: ``_build_attention_metadata``, its CPU runner included; the V2
    runner: ``prepare_attn``, with the step's input batch). Call from a builder's
    ``__init__``: the runner's module is loaded by then, and a process that never builds
    UNISPARSE metadata is left untouched. Idempotent."""
    for module_name, class_name, method, rows_of in _RUNNERS:
        module = sys.modules.get(module_name)
        runner = getattr(module, class_name, None)
        if runner is not None:
            note_steps(runner, method, rows_of)


def note_steps(runner: type, method: str, rows_of: Callable[..., Callable[[], tuple]]) -> None:
    """Wrap ``runner.method`` to note ``rows_of(self, *args)`` before each call."""
    original = getattr(runner, method)
    if getattr(original, "_unisparse_tracked", False):
        return

    @functools.wraps(original)
    def noting(self: Any, *args: Any, **kwargs: Any) -> Any:
        global _step_rows
        _step_rows = rows_of(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    noting._unisparse_tracked = True  # type: ignore[attr-defined]
    setattr(runner, method, noting)


def prompt_lengths(
    first_request: int, query_lens: Sequence[int], seq_lens: Sequence[int]
) -> tuple[int, ...] | None:
    """The prompt length of requests ``first_request ..`` of the step being built, or None:
    no step noted, or its rows are not these requests (their computed tokens + this step's
    != their sequence lengths). Callers then take each chunk's end for its prompt's end."""
    if _step_rows is None:
        return None
    rows = slice(first_request, first_request + len(seq_lens))
    try:
        prompt_ends, computed_before = _step_rows()
        prompts = prompt_ends[rows].tolist()
        computed = computed_before[rows].tolist()
    except (AttributeError, TypeError) as err:
        _report_unknown_once(f"the runner's rows could not be read: {err}")
        return None
    if [c + n for c, n in zip(computed, query_lens, strict=False)] != list(seq_lens):
        shown = slice(0, 8)  # a batch may hold hundreds of requests: its first rows say why
        _report_unknown_once(
            f"rows {first_request}.. (the first 8): computed {computed[shown]} + scheduled "
            f"{list(query_lens)[shown]} != sequence lengths {list(seq_lens)[shown]} "
            f"(prompts {prompts[shown]})"
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
