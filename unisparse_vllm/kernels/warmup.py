"""Compile the sparse prefill's Triton kernels at start-up instead of inside a request.

Triton compiles a kernel at its first launch with each new set of compile-time values:
seconds for the attention kernel, under a second for the others. Left alone, the first long
prompt after a start pays all of it in its time to first token (vLLM's JIT monitor warns),
and later prompts pay again whenever a step brings a new variant. Two things make one
warm-up enough:

- the kernels' per-step integers (row counts, table widths, the strides of per-step
  tensors) are ``do_not_specialize``: Triton would otherwise compile a variant per
  "divisible by 16" / "equal to 1" class of each; pointers are 16-byte aligned
  (``core.int32_tables``) or, vLLM's block table sliced past the decodes, not specialized
  on alignment;
- what remains compile-time is fixed by the model and the config (head size, dtype, group,
  block and composite sizes, each layer's selection mode, the bounds of its budget), except
  the selection kernel's row width (a power of two >= the key blocks of the longest
  sequence): ``warm_up`` launches every width up to ``max_seq_len``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..config import LayerBudget, UniSparseConfig
from ..core import PagedKV, PrefillBatch
from . import flash, plan_prefill
from .attention import sparse_attention
from .select import row_tile, select_blocks


def warm_up(
    config: UniSparseConfig,
    budgets: Iterable[LayerBudget],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    page_size: int,
    max_seq_len: int,
    device: torch.device | str,
) -> int:
    """Run the estimator, the selection (every row width) and the attention kernel once per
    distinct sparse budget on a small synthetic step; return the number of steps run.
    Dense layers need nothing. Results are discarded: only the compiled kernels stay."""
    distinct = {b.model_dump_json(): b for b in budgets if not b.dense}
    if not distinct:
        return 0
    block = config.block_size
    # Three blocks, the last partial: rows to estimate, a dense tail, a partial diagonal.
    seq_len = 2 * block + block // 2
    pages = math.ceil(seq_len / page_size)
    key_cache = torch.randn(pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    kv = PagedKV(
        key_cache,
        torch.randn_like(key_cache),
        torch.arange(pages, dtype=torch.int32, device=device)[None],
    )
    query = torch.randn(seq_len, num_heads, head_dim, dtype=dtype, device=device)
    batch = PrefillBatch.from_lens([seq_len])
    step_config = config.model_copy(update={"min_sparse_tokens": 0})
    scale = head_dim**-0.5
    widest = row_tile(math.ceil(max_seq_len / block))
    widths = [2**p for p in range(4, widest.bit_length())]  # 16 .. widest
    for budget in distinct.values():
        plan = plan_prefill(query, kv, batch, step_config, budget, scale=scale)
        sparse_attention(query, kv, batch, plan, scale)
        if flash.unusable_reason(query, kv, plan) is None:  # FA3's tables, built by Triton
            flash.virtual_sequences(batch, kv, plan)
        for width in widths:
            mass = torch.rand(1, 1, width, device=device)
            select_blocks(mass, torch.tensor([width - 1], device=device), budget)
    return len(distinct)
