"""The benchmark's FlexAttention column runs our plans as its block mask: the block tables
hold the plan's blocks, and the output equals the reference sparse attention
(FlexAttention's eager path, on the CPU)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_flex_block_mask_computes_the_plan(density: float) -> None:
    pytest.importorskip("torch.nn.attention.flex_attention")
    from bench_attention import DIM, HKV, HQ, fixed_density_plan, flex_block_mask
    from torch.nn.attention.flex_attention import flex_attention

    from unisparse_vllm import core

    seq = 1024
    batch = core.PrefillBatch.from_lens([seq])
    plan = fixed_density_plan(batch, density, 128, "cpu")
    query, keys, values = (torch.randn(seq, h, DIM) for h in (HQ, HKV, HKV))
    scale = 1 / math.sqrt(DIM)
    expected = core.sparse_attention(
        query, core.ContiguousKV(keys, values, (0,)), batch, plan, scale
    )
    q, k, v = (t.transpose(0, 1)[None] for t in (query, keys, values))
    mask = flex_block_mask(plan, seq)
    # the block tables (what compiled FlexAttention iterates): the plan's blocks per query
    # head, the diagonal one partial (causal), every other one full
    chosen = plan.block_mask(0, 8).repeat_interleave(HQ // HKV, 0)
    assert torch.equal(mask.to_dense()[0].bool(), chosen)
    assert torch.equal(mask.full_kv_num_blocks[0], chosen.sum(-1).int() - 1)
    got = flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
    torch.testing.assert_close(got[0].transpose(0, 1), expected, atol=1e-4, rtol=1e-4)
