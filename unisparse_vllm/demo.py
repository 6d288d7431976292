"""``unisparse demo``: the method end to end on a built-in synthetic long-context case.

Runs on the CPU with no model and no download: estimate, select, attend (the core
reference), then measure against exact attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import UniSparseConfig, resolve_config
from .core import (
    ContiguousKV,
    PrefillBatch,
    attended_pairs,
    block_mass,
    exact_attention,
    fidelity,
    plan_prefill,
    sparse_attention,
)
from .synthetic import structured_qkv


@dataclass(frozen=True)
class DemoRow:
    tau: float
    density: float
    recall_mean: float
    recall_min: float
    relative_error: float
    rank_correlation: float
    flop_speedup: float


def run_demo(
    seq_len: int = 8192,
    taus: tuple[float, ...] = (0.8, 0.9, 0.95, 1.0),
    config: UniSparseConfig | None = None,
    seed: int = 0,
) -> list[DemoRow]:
    """One sequence of ``seq_len`` tokens, 8 query / 2 KV heads, head_dim 64."""
    config = config or resolve_config({"min_sparse_tokens": 0})
    query, keys, values = structured_qkv(seq_len, seed=seed)
    batch = PrefillBatch.from_lens([seq_len])
    kv = ContiguousKV(keys, values, (0,))
    scale = 1 / math.sqrt(query.shape[-1])
    c_h = config.heads_per_selection(query.shape[1], keys.shape[1])
    estimate = block_mass(
        query,
        keys,
        0,
        block_size=config.block_size,
        c_q=config.c_q,
        c_k=config.c_k,
        c_h=c_h,
        scale=scale,
    )
    exact = exact_attention(query, kv, batch, config.block_size, scale)
    # The estimator's dot products, per selection head, against attention's per query head
    # (attended_pairs counts per selection head, and each stands for c_h query heads).
    estimate_pairs = (seq_len / config.c_q) * (seq_len / config.c_k) / 2 * (query.shape[1] // c_h)

    rows = []
    for tau in taus:
        budget = config.for_layer(0).model_copy(update={"tau": tau, "mode": "top_p"})
        plan = plan_prefill(query, kv, batch, config, budget, scale=scale)
        sparse = sparse_attention(query, kv, batch, plan, scale)
        fid = fidelity(plan, batch, exact, sparse, [estimate])
        computed, dense_pairs = attended_pairs(plan, batch)
        rows.append(
            DemoRow(
                tau=tau,
                density=fid.density,
                recall_mean=fid.mass_recall_mean,
                recall_min=fid.mass_recall_min,
                relative_error=fid.relative_error,
                rank_correlation=fid.rank_correlation_median,
                flop_speedup=dense_pairs * c_h / (computed * c_h + estimate_pairs),
            )
        )
    return rows


def format_table(rows: list[DemoRow]) -> str:
    header = (
        f"{'tau':>5} {'density':>8} {'recall':>7} {'recall_min':>10} {'rel_err':>8} "
        f"{'rank_corr':>9} {'FLOP_speedup':>12}"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r.tau:>5.2f} {r.density:>8.3f} {r.recall_mean:>7.4f} {r.recall_min:>10.4f} "
            f"{r.relative_error:>8.4f} {r.rank_correlation:>9.3f} {r.flop_speedup:>11.2f}x"
        )
    return "\n".join(lines)
