"""Fidelity metrics against hand-checkable cases."""

from __future__ import annotations

import torch
from helpers import random_batch

from unisparse_vllm.config import resolve_config
from unisparse_vllm.core import (
    attended_pairs,
    block_mass,
    exact_attention,
    fidelity,
    plan_prefill,
    sparse_attention,
    spearman,
)


def test_spearman() -> None:
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert abs(spearman(a, a * 10) - 1.0) < 1e-12
    assert abs(spearman(a, -a) + 1.0) < 1e-12
    assert abs(spearman(a, torch.tensor([1.0, 3.0, 2.0, 4.0])) - 0.8) < 1e-12


def test_attended_pairs_counts_causal_work() -> None:
    query, kv, batch = random_batch([100, 64], [28, 0], 2, 1, 8)
    config = resolve_config(
        {"block_size": 64, "c_q": 8, "c_k": 8, "tau": 1.0, "min_sparse_tokens": 0}
    )
    plan = plan_prefill(query, kv, batch, config, config.for_layer(0), scale=0.3)
    computed, dense = attended_pairs(plan, batch)
    # request 0: queries at 28..127 see 29..128 keys; request 1: 1..64 keys.
    expected = sum(range(29, 129)) + sum(range(1, 65))
    assert computed == dense == expected


def test_fidelity_of_dense_and_sparse_plans() -> None:
    query, kv, batch = random_batch([256], [0], 4, 2, 16, seed=4)
    config = resolve_config(
        {"block_size": 64, "c_q": 8, "c_k": 8, "min_sparse_tokens": 0, "local_blocks": 1}
    )
    exact = exact_attention(query, kv, batch, 64, 0.25)
    keys, _ = kv.keys_values(0, 256)
    estimate = [block_mass(query, keys, 0, block_size=64, c_q=8, c_k=8, c_h=2, scale=0.25)]
    results = {}
    for tau in (0.3, 1.0):
        budget = config.for_layer(0).model_copy(update={"tau": tau})
        plan = plan_prefill(query, kv, batch, config, budget, scale=0.25)
        out = sparse_attention(query, kv, batch, plan, 0.25)
        results[tau] = fidelity(plan, batch, exact, out, estimate)
    dense, sparse = results[1.0], results[0.3]
    assert dense.density == 1.0 and abs(dense.mass_recall_min - 1.0) < 1e-12
    assert dense.relative_error < 1e-12
    assert sparse.density < 1.0 and sparse.mass_recall_mean < 1.0 and sparse.relative_error > 0
    assert -1.0 <= sparse.rank_correlation_median <= 1.0
