"""Fast implementations of ``core``'s functions, with the same signatures, and the dispatch.

``UNISPARSE_KERNELS`` (or ``use()``) picks: ``auto`` (default: Triton for CUDA tensors, the
core reference elsewhere), ``triton`` (also on the CPU under ``TRITON_INTERPRET=1``, for
tests) or ``reference``.
"""

from __future__ import annotations

import os

from torch import Tensor

from .. import core
from ..config import LayerBudget, UniSparseConfig
from ..core import BlockPlan, KVSource, PagedKV, PrefillBatch

CHOICES = ("auto", "triton", "reference")
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
    return choice_ == "triton"


def plan_prefill(
    query: Tensor,
    kv: KVSource,
    batch: PrefillBatch,
    config: UniSparseConfig,
    budget: LayerBudget,
    *,
    scale: float,
    prompt_lens: tuple[int, ...] | None = None,
) -> BlockPlan:
    """``core.plan_prefill``; UniSparse's block mass through the fused kernel when Triton is
    chosen (the peers' rules always run their PyTorch reference)."""
    estimator = None
    if config.estimator == "unisparse" and _triton_for(query):
        from .estimate import batch_block_mass

        estimator = batch_block_mass
    return core.plan_prefill(
        query, kv, batch, config, budget, scale=scale, prompt_lens=prompt_lens, estimator=estimator
    )


def sparse_attention(
    query: Tensor,
    kv: KVSource,
    batch: PrefillBatch,
    plan: BlockPlan,
    scale: float,
    out: Tensor | None = None,
) -> Tensor:
    """``core.sparse_attention``; the Triton kernel reads paged caches only."""
    if _triton_for(query) and isinstance(kv, PagedKV):
        from .attention import sparse_attention as triton_sparse_attention

        return triton_sparse_attention(query, kv, batch, plan, scale, out=out)
    return core.sparse_attention(query, kv, batch, plan, scale, out=out)
