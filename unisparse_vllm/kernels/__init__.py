"""Fast implementations of ``core``'s functions, with the same signatures, and the dispatch.

``UNISPARSE_KERNELS`` (or ``use()``) picks: ``auto`` (default: for CUDA tensors the Triton
plan, and attention by FA3 where it runs (``flash.unusable_reason``) and the step is large
enough for its per-call cost (``attention_implementation``), else by the Triton kernel; the
core reference elsewhere), ``flash`` (FA3 attention or an error saying why not),
``triton`` (Triton only; also on the CPU under ``TRITON_INTERPRET=1``, for tests) or
``reference``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import Tensor

from .. import core
from ..config import LayerBudget, UniSparseConfig
from ..core import BlockPlan, KVSource, PagedKV, PrefillBatch

CHOICES = ("auto", "flash", "triton", "reference")
_choice: str | None = None


def use(choice: str | None) -> None:
    """Force an implementation for this process (``None``: back to ``UNISPARSE_KERNELS``)."""
    if choice is not None and choice not in CHOICES:
        raise ValueError(f"kernel choice must be one of {CHOICES}, got {choice!r}")
    global _choice
    _choice = choice


def choice() -> str:
    """The implementation in force; a bad ``UNISPARSE_KERNELS`` raises (backends call this
    at start-up, so a typo stops the engine there rather than at the first long prompt)."""
    chosen = _choice or os.environ.get("UNISPARSE_KERNELS", "auto")
    if chosen not in CHOICES:
        raise ValueError(f"UNISPARSE_KERNELS must be one of {CHOICES}, got {chosen!r}")
    return chosen


def _triton_for(tensor: Tensor) -> bool:
    choice_ = choice()
    if choice_ == "auto":
        return tensor.is_cuda
    return choice_ in ("flash", "triton")


def plan_prefill(
    query: Tensor,
    kv: KVSource,
    batch: PrefillBatch,
    config: UniSparseConfig,
    budget: LayerBudget | Sequence[LayerBudget],
    *,
    scale: float,
    prompt_lens: tuple[int, ...] | None = None,
) -> BlockPlan:
    """``core.plan_prefill`` with the Triton selection, and UniSparse's block mass through
    the fused kernel, when Triton is chosen (the peers' rules run their PyTorch reference)."""
    if not _triton_for(query):
        return core.plan_prefill(
            query, kv, batch, config, budget, scale=scale, prompt_lens=prompt_lens
        )
    from .estimate import batch_block_mass
    from .select import select_blocks as triton_select_blocks

    return core.plan_prefill(
        query,
        kv,
        batch,
        config,
        budget,
        scale=scale,
        prompt_lens=prompt_lens,
        estimator=(
            batch_block_mass
            if config.estimator == "unisparse" and isinstance(kv, PagedKV)
            else None
        ),
        selector=triton_select_blocks,
    )


def select_blocks(
    mass: Tensor, query_block: Tensor, budget: LayerBudget, dense_rows: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``core.select_blocks``; one Triton program per (head, row)."""
    if _triton_for(mass):
        from .select import select_blocks as triton_select_blocks

        return triton_select_blocks(mass, query_block, budget, dense_rows)
    return core.select_blocks(mass, query_block, budget, dense_rows)


# The selected density above which the sparse step is slower than dense FA3, plan included
# (H200, benchmarks/RESULTS.md section 1, fourth run): attention through FA3 costs about
# 0.04 + 1.09 d of FA3's dense time at 32K (0.01 + 1.03 d at 128K), the Triton kernel
# 0.04 + 1.94 d; the plan adds 1-3.5%. The CPU reference is not timed: Triton's value.
BREAK_EVEN_DENSITY = {"flash": 0.85, "triton": 0.45, "reference": 0.45}


# Per layer and step on an H200 (head_dim 128, Llama-8B heads; RESULTS.md section 1, fourth
# run): the Triton kernel costs ~3.2e-5 ms per selected (key block, query head) pair, FA3
# over virtual sequences ~2.0e-5 ms per pair plus ~0.028 ms per call (one call per KV head,
# which was one per selection group there; tables included). Pair costs are taken to scale
# with the head size (the matmul FLOPs do; only 128 was timed), the call cost not. So small
# steps (short chunks, low density) are faster in Triton: one-shot 4K dense, 17K pairs, took
# 0.51 ms there against 0.56 in FA3; 32K at density 0.05, 58K pairs, 1.98 against 1.38.
# The choice counts the step's causal pairs, not the selected ones: those are on the device,
# and reading them would make the host wait for the GPU at every layer (on a 0.5B model that
# wait cost more than the sparse attention saved; RESULTS.md section 4). So a step of many
# causal but few selected pairs may take FA3 where the Triton kernel was a little faster.
TRITON_MS_PER_PAIR, FLASH_MS_PER_PAIR, FLASH_MS_PER_CALL = 3.2e-5, 2.0e-5, 0.028


def _flash_pays(batch: PrefillBatch, kv: PagedKV, plan: BlockPlan, head_dim: int) -> bool:
    causal = core.causal_row_blocks(batch, plan.block_size) * plan.counts.shape[0]
    pairs = causal * plan.heads_per_selection * head_dim / 128
    calls = kv.num_kv_heads  # flash.sparse_attention: one call per KV head
    return (TRITON_MS_PER_PAIR - FLASH_MS_PER_PAIR) * pairs > FLASH_MS_PER_CALL * calls


def attention_implementation(
    query: Tensor, kv: KVSource, batch: PrefillBatch, plan: BlockPlan
) -> str:
    """Which attention runs this plan: ``flash``, ``triton`` or ``reference``. ``auto`` takes
    FA3 where it runs and the step is large enough for its per-call cost to pay."""
    choice_ = choice()
    if choice_ in ("auto", "flash") and isinstance(kv, PagedKV):
        from . import flash

        reason = flash.unusable_reason(query, kv, plan)
        if choice_ == "flash" and reason is not None:
            raise ValueError(f"UNISPARSE_KERNELS=flash: {reason}")
        if choice_ == "flash" or (reason is None and _flash_pays(batch, kv, plan, query.shape[-1])):
            return "flash"
    return "triton" if _triton_for(query) and isinstance(kv, PagedKV) else "reference"


def dense_above_density(implementation: str, config: UniSparseConfig) -> float | None:
    """The config's ``dense_above_density``, ``auto`` resolved for ``implementation`` (what
    ``attention_implementation`` chose for the step)."""
    if config.dense_above_density == "auto":
        return BREAK_EVEN_DENSITY[implementation]
    return config.dense_above_density


def sparse_attention(
    query: Tensor,
    kv: KVSource,
    batch: PrefillBatch,
    plan: BlockPlan,
    scale: float,
    out: Tensor | None = None,
) -> Tensor:
    """``core.sparse_attention``; FA3 and the Triton kernel read paged caches only."""
    implementation = attention_implementation(query, kv, batch, plan)
    if implementation == "flash":
        from .flash import sparse_attention as flash_sparse_attention

        return flash_sparse_attention(query, kv, batch, plan, scale, out=out)  # type: ignore[arg-type]
    if implementation == "triton":
        from .attention import sparse_attention as triton_sparse_attention

        return triton_sparse_attention(query, kv, batch, plan, scale, out=out)  # type: ignore[arg-type]
    return core.sparse_attention(query, kv, batch, plan, scale, out=out)
