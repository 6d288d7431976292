"""The plan as FA3 virtual sequences (``kernels.flash``): on the CPU against FA3's contract
written out in PyTorch (paged keys, bottom-right causal), on a GPU with vLLM against FA3."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import random_batch

from unisparse_vllm.config import resolve_config
from unisparse_vllm.core import PagedKV, plan_prefill, relative_error, sparse_attention
from unisparse_vllm.kernels import flash

# The virtual tables come from a Triton kernel: on a GPU compiled for it, on the CPU through
# the interpreter (conftest). The contract check itself runs on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    # query_lens, context_lens, Hq, Hkv, head_dim, block, page, c_h
    ([300], [0], 4, 2, 64, 64, 16, None),
    ([130, 70], [64, 200], 4, 1, 32, 64, 32, None),  # chunks over cached prefixes
    ([280], [40], 6, 2, 32, 64, 16, 1),  # one selection per query head
    ([700, 300], [0, 77], 2, 1, 32, 128, 8, None),  # context not block-aligned
]


def fa3_contract(
    query: torch.Tensor, kv: PagedKV, virtual: flash.VirtualSequences, scale: float
) -> torch.Tensor:
    """What one ``flash_attn_varlen_func(causal=True, block_table=..., seqused_k=...)`` call
    per KV head computes over the packed queries, sequence by sequence: the sequence's keys
    are its table's pages in order, and query ``i`` of ``n`` sees keys
    ``< seqused_k - n + i + 1``."""
    query = query.cpu()
    kv = PagedKV(*(t.cpu() for t in (kv.key_cache, kv.value_cache, kv.block_table)))
    virtual = dataclasses.replace(
        virtual,
        cu_seqlens_q=virtual.cu_seqlens_q.cpu(),
        seq_lens=virtual.seq_lens.cpu(),
        block_table=virtual.block_table.cpu(),
    )
    out = torch.full_like(query, float("nan"))
    group = query.shape[1] // kv.num_kv_heads
    selections = virtual.selections_per_kv_head
    cu = virtual.cu_seqlens_q.tolist()
    for kv_head in range(kv.num_kv_heads):
        heads = slice(kv_head * group, (kv_head + 1) * group)
        packed_query = flash.pack_queries(query[:, heads], selections)
        packed_out = torch.full_like(packed_query, float("nan"))
        for seq in range(len(cu) - 1):
            n, keys_used = cu[seq + 1] - cu[seq], int(virtual.seq_lens[kv_head, seq])
            pages = virtual.block_table[kv_head, seq, : math.ceil(keys_used / kv.page_size)]
            k = kv.key_cache[pages.long(), :, kv_head].flatten(0, 1)[:keys_used].double()
            v = kv.value_cache[pages.long(), :, kv_head].flatten(0, 1)[:keys_used].double()
            q = packed_query[cu[seq] : cu[seq + 1]].double()
            visible = (
                torch.arange(keys_used)[None, :] < keys_used - n + torch.arange(n)[:, None] + 1
            )
            scores = torch.einsum("nhd,kd->hnk", q, k) * scale
            weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            packed_out[cu[seq] : cu[seq + 1]] = torch.einsum("hnk,kd->nhd", weights, v).to(
                query.dtype
            )
        out[:, heads] = flash.unpack_queries(packed_out, selections)
    return out


def plan_for(case, seed: int, device: str = "cpu", dtype=torch.float32):
    query_lens, context_lens, hq, hkv, dim, block, page, c_h = case
    query, kv, batch = random_batch(query_lens, context_lens, hq, hkv, dim, dtype=dtype, seed=seed)
    paged = kv.to_paged(batch, page, torch.Generator().manual_seed(seed))
    paged = PagedKV(
        *(t.to(device) for t in (paged.key_cache, paged.value_cache, paged.block_table))
    )
    query = query.to(device)
    config = resolve_config(
        {"block_size": block, "c_q": 16, "c_k": 16, "c_h": c_h, "tau": 0.6, "min_sparse_tokens": 0}
    )
    scale = 1 / math.sqrt(dim)
    plan = plan_prefill(query, paged, batch, config, config.for_layer(0), scale=scale)
    return query, paged, batch, plan, scale


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{c[0]}-c{c[1]}-B{c[5]}-p{c[6]}-ch{c[7]}")
def test_virtual_sequences_attend_to_the_planned_blocks(case) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()))
    query, paged, batch, plan, scale = plan_for(case, seed, DEVICE)
    assert plan.density() < 1.0, "the case must be sparse to test the tables"
    virtual = flash.virtual_sequences(batch, paged, plan)
    out = fa3_contract(query, paged, virtual, scale)
    expected = sparse_attention(query, paged, batch, plan, scale).cpu()
    assert not out.isnan().any(), f"rows not covered by the virtual sequences (seed {seed})"
    assert relative_error(out, expected) < 1e-5, f"seed {seed}"


def test_plans_fa3_cannot_run_say_why() -> None:
    query, paged, _, plan, _ = plan_for(([200], [0], 2, 1, 32, 64, 128, None), seed=0)
    assert "not a multiple of the KV page size 128" in flash.unusable_reason(query, paged, plan)
    query, paged, _, plan, _ = plan_for(CASES[0], seed=0)
    assert "fp16/bf16" in flash.unusable_reason(query, paged, plan)
    odd = torch.zeros(*query.shape[:-1], 60, dtype=torch.float16)
    assert "multiples of 8 up to 256, got 60" in flash.unusable_reason(odd, paged, plan)
    if not torch.cuda.is_available():
        half = PagedKV(paged.key_cache.half(), paged.value_cache.half(), paged.block_table)
        assert "CUDA" in flash.unusable_reason(query.half(), half, plan)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FA3 needs a GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{c[0]}-c{c[1]}-B{c[5]}-p{c[6]}-ch{c[7]}")
def test_fa3_runs_the_plan(case) -> None:
    pytest.importorskip("vllm.vllm_flash_attn")
    query_lens, context_lens, *rest = case
    case = ([n * 16 for n in query_lens], [c * 16 for c in context_lens], *rest)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    query, paged, batch, plan, scale = plan_for(case, seed, "cuda", torch.bfloat16)
    expected = sparse_attention(query, paged, batch, plan, scale)
    out = torch.full_like(query, float("nan"))
    flash.sparse_attention(query, paged, batch, plan, scale, out=out)
    assert not out.isnan().any(), f"seed {seed}"
    assert relative_error(out, expected) < 1e-2, f"seed {seed}"


def test_the_flash_choice_names_why_fa3_cannot_run() -> None:
    from unisparse_vllm import kernels

    query, paged, batch, plan, scale = plan_for(CASES[0], seed=0)
    kernels.use("flash")
    try:
        with pytest.raises(ValueError, match="UNISPARSE_KERNELS=flash: FA3 takes fp16/bf16"):
            kernels.sparse_attention(query, paged, batch, plan, scale)
    finally:
        kernels.use(None)
    expected = sparse_attention(query, paged, batch, plan, scale)
    assert torch.equal(kernels.sparse_attention(query, paged, batch, plan, scale), expected)


def test_auto_dense_threshold_follows_the_attention_that_runs() -> None:
    from unisparse_vllm import kernels

    query, paged, batch, plan, _ = plan_for(CASES[0], seed=0)
    auto, fixed = (
        resolve_config({"dense_above_density": "auto"}),
        resolve_config({"dense_above_density": 0.2}),
    )
    assert resolve_config({}).dense_above_density is None  # no check: no host wait per layer
    on_cpu = kernels.attention_implementation(query, paged, batch, plan)
    assert on_cpu == "reference" and kernels.dense_above_density(on_cpu, auto) == 0.45
    assert kernels.dense_above_density(on_cpu, fixed) == 0.2
    assert kernels.dense_above_density("flash", auto) == 0.85


def test_auto_takes_fa3_only_where_its_per_call_cost_pays(monkeypatch) -> None:
    from unisparse_vllm import kernels

    query, paged, batch, plan, _ = plan_for(CASES[0], seed=0)
    monkeypatch.setattr(flash, "unusable_reason", lambda *args: None)  # as on a Hopper GPU
    pairs = plan.block_totals()[1] * plan.heads_per_selection  # causal: the step's size
    assert pairs < 2000 and kernels.attention_implementation(query, paged, batch, plan) != "flash"
    monkeypatch.setattr(kernels, "FLASH_MS_PER_CALL", 0.0)
    assert kernels.attention_implementation(query, paged, batch, plan) == "flash"
    kernels.use("flash")  # insisting skips the cost model
    monkeypatch.setattr(kernels, "FLASH_MS_PER_CALL", 1e9)
    try:
        assert kernels.attention_implementation(query, paged, batch, plan) == "flash"
    finally:
        kernels.use(None)
