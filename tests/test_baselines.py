"""Peer estimators (XAttention-style, FlexPrefill-style) against exact block mass."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from unisparse_vllm.config import resolve_config
from unisparse_vllm.core import exact_key_block_probs, plan_prefill
from unisparse_vllm.core.baselines import last_block_block_mass, xattention_block_mass

CONFIG = resolve_config({"block_size": 64, "c_q": 8, "c_k": 8, "min_sparse_tokens": 0})


def _exact_mean(query, kv, batch, r: int) -> torch.Tensor:
    c, n = batch.context_lens[r], batch.query_lens[r]
    keys, _ = kv.keys_values(r, c + n)
    probs = exact_key_block_probs(query[batch.query_slice(r)], keys, c, 64, 0.25)
    rows = torch.arange(c, c + n) // 64 - c // 64
    out = probs.new_zeros(probs.shape[0], int(rows.max()) + 1, probs.shape[2])
    out.index_add_(1, rows, probs)
    return out / torch.bincount(rows)[None, :, None]


def test_xattention_with_stride_one_is_exact_block_mass() -> None:
    query, kv, batch = random_batch([256, 128], [0, 64], 2, 2, 8, seed=2)
    mass = xattention_block_mass(
        query, kv, batch, [True, True], config=CONFIG, c_h=1, scale=0.25, stride=1
    )
    torch.testing.assert_close(
        mass[:, :4, :4].double(), _exact_mean(query, kv, batch, 0).float().double()
    )
    torch.testing.assert_close(
        mass[:, 4:, :3].double(), _exact_mean(query, kv, batch, 1).float().double()
    )


def test_last_block_estimate_is_exact_for_a_single_block_chunk() -> None:
    query, kv, batch = random_batch([64], [192], 2, 1, 8, seed=3)
    mass = last_block_block_mass(query, kv, batch, [True], config=CONFIG, c_h=1, scale=0.25)
    torch.testing.assert_close(mass.double(), _exact_mean(query, kv, batch, 0).float().double())


def test_baselines_plug_into_the_same_plan() -> None:
    query, kv, batch = random_batch([300], [0], 4, 2, 16, seed=4)
    for estimator in (xattention_block_mass, last_block_block_mass):
        mass = estimator(query, kv, batch, [True], config=CONFIG, c_h=2, scale=0.25)
        causal = torch.arange(5)[None, :] <= torch.arange(5)[:, None]
        torch.testing.assert_close(mass.sum(-1), torch.ones(2, 5))
        assert (mass[:, ~causal] == 0).all()
        for tau, dense in ((0.5, False), (1.0, True)):
            budget = CONFIG.for_layer(0).model_copy(update={"tau": tau})
            plan = plan_prefill(query, kv, batch, CONFIG, budget, scale=0.25, estimator=estimator)
            assert (plan.density() == 1.0) == dense


def test_config_estimator_picks_the_rule() -> None:
    query, kv, batch = random_batch([300], [0], 4, 2, 16, seed=5)
    config = resolve_config(
        {"block_size": 64, "c_q": 8, "c_k": 8, "min_sparse_tokens": 0, "estimator": "xattention"}
    )
    budget = config.for_layer(0).model_copy(update={"tau": 0.6})
    by_config = plan_prefill(query, kv, batch, config, budget, scale=0.25)
    explicit = plan_prefill(
        query, kv, batch, config, budget, scale=0.25, estimator=xattention_block_mass
    )
    assert torch.equal(by_config.indices, explicit.indices)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU runs)")
def test_baselines_keep_their_work_on_the_inputs_device() -> None:
    """A CPU intermediate once made the XAttention rule crawl and the last-block rule fail
    inside vLLM on the H200: the estimate must match the same estimate on the CPU."""
    query, kv, batch = random_batch([300, 200], [0, 100], 4, 2, 16, seed=6)
    cuda_kv = type(kv)(kv.keys.cuda(), kv.values.cuda(), kv.seq_start)
    for estimator in (xattention_block_mass, last_block_block_mass):
        on_cpu = estimator(query, kv, batch, [True, True], config=CONFIG, c_h=2, scale=0.25)
        on_gpu = estimator(
            query.cuda(), cuda_kv, batch, [True, True], config=CONFIG, c_h=2, scale=0.25
        )
        assert on_gpu.is_cuda
        torch.testing.assert_close(on_gpu.cpu(), on_cpu)
