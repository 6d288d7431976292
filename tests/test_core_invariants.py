"""The invariants of ALGORITHM.md section 8, on the core reference."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_batch, sdpa_reference
from hypothesis import given, settings
from hypothesis import strategies as st

from unisparse_vllm.config import resolve_config
from unisparse_vllm.core import (
    ContiguousKV,
    PrefillBatch,
    block_mass,
    composite_keys,
    composite_queries,
    dense_attention,
    plan_prefill,
    relative_error,
    select_blocks,
    sparse_attention,
)

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def batches(draw: st.DrawFn) -> dict:
    num_kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4]))
    num_requests = draw(st.integers(1, 3))
    return dict(
        query_lens=[draw(st.integers(1, 300)) for _ in range(num_requests)],
        context_lens=[draw(st.sampled_from([0, 0, 16, 48, 64, 200])) for _ in range(num_requests)],
        num_q_heads=num_kv_heads * group,
        num_kv_heads=num_kv_heads,
        head_dim=draw(st.sampled_from([8, 16])),
        seed=draw(st.integers(0, 2**16)),
    )


def _config(**inline):
    # Toy requests have a handful of blocks: one local block leaves some to select.
    base = {"block_size": 64, "c_q": 8, "c_k": 8, "min_sparse_tokens": 0, "local_blocks": 1}
    return resolve_config({**base, **inline})


@SETTINGS
@given(shape=batches(), tau=st.sampled_from([0.5, 0.8, 0.95]))
def test_selection_is_well_formed(shape: dict, tau: float) -> None:
    query, kv, batch = random_batch(**shape)
    config = _config(tau=tau, sink_blocks=1, local_blocks=2, dense_tail_blocks=0)
    plan = plan_prefill(query, kv, batch, config, config.for_layer(0), scale=0.25)
    for s in range(plan.counts.shape[0]):
        for row in range(plan.num_rows):
            i = int(plan.row_block[row])
            count = int(plan.counts[s, row])
            chosen = plan.indices[s, row, :count].tolist()
            assert count <= i + 1, "more blocks than causal"
            assert chosen == sorted(set(chosen)), "indices must be ascending and unique"
            assert 0 in chosen and i in chosen, "sink and diagonal blocks are always selected"
            assert i - 1 in chosen or i == 0, "local_blocks=2 forces the block before the diagonal"
            assert all(0 <= j <= i for j in chosen)
            assert (plan.indices[s, row, count:] == -1).all()


@SETTINGS
@given(shape=batches())
def test_tau_one_is_dense_attention(shape: dict) -> None:
    query, kv, batch = random_batch(**shape)
    config = _config(tau=1.0)
    scale = 1 / math.sqrt(shape["head_dim"])
    plan = plan_prefill(query, kv, batch, config, config.for_layer(0), scale=scale)
    assert plan.density() == 1.0
    sparse = sparse_attention(query, kv, batch, plan, scale)
    reference = sdpa_reference(query, kv, batch, scale)
    assert relative_error(sparse, reference) < 1e-10
    assert relative_error(dense_attention(query, kv, batch, scale), reference) < 1e-10


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_tau_one_is_dense_in_half_precision(dtype: torch.dtype, tolerance: float) -> None:
    query, kv, batch = random_batch([200, 90], [64, 0], 4, 2, 16, dtype=dtype, seed=3)
    config = _config(tau=1.0)
    plan = plan_prefill(query, kv, batch, config, config.for_layer(0), scale=0.25)
    sparse = sparse_attention(query, kv, batch, plan, 0.25)
    assert sparse.dtype == dtype
    assert relative_error(sparse, sdpa_reference(query, kv, batch, 0.25)) < tolerance


@SETTINGS
@given(shape=batches(), taus=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=2))
def test_raising_tau_never_removes_a_block(shape: dict, taus: list[float]) -> None:
    query, kv, batch = random_batch(**shape)
    low, high = sorted(taus)
    masks = []
    for tau in (low, high):
        config = _config(tau=tau)
        plan = plan_prefill(query, kv, batch, config, config.for_layer(0), scale=0.25)
        masks.append([plan.block_mask(r, 64) for r in range(batch.num_requests)])
    for low_mask, high_mask in zip(*masks, strict=True):
        assert not (low_mask & ~high_mask).any()


@SETTINGS
@given(
    seq_blocks=st.integers(2, 6),
    tail=st.integers(1, 63),
    split_blocks=st.data(),
    group=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_chunked_prefill_matches_one_shot(seq_blocks, tail, split_blocks, group, seed) -> None:
    seq_len = seq_blocks * 64 + tail
    split = split_blocks.draw(st.integers(1, seq_blocks)) * 64
    query, kv, _ = random_batch([seq_len], [0], 2 * group, 2, 16, seed=seed)
    config = _config(tau=0.7)
    one_shot = PrefillBatch.from_lens([seq_len])
    plan = plan_prefill(query, kv, one_shot, config, config.for_layer(0), scale=0.25)
    expected = sparse_attention(query, kv, one_shot, plan, 0.25)
    outputs = []
    for start, end in ((0, split), (split, seq_len)):
        chunk = PrefillBatch.from_lens([end - start], [start])
        chunk_plan = plan_prefill(
            query[start:end],
            kv,
            chunk,
            config,
            config.for_layer(0),
            scale=0.25,
            prompt_lens=(seq_len,),
        )
        outputs.append(sparse_attention(query[start:end], kv, chunk, chunk_plan, 0.25))
    assert torch.equal(torch.cat(outputs), expected)


@SETTINGS
@given(shape=batches(), page_size=st.sampled_from([1, 16, 32]), seed=st.integers(0, 99))
def test_paged_cache_matches_contiguous(shape: dict, page_size: int, seed: int) -> None:
    query, kv, batch = random_batch(**shape)
    paged = kv.to_paged(batch, page_size, torch.Generator().manual_seed(seed))
    # Unused page slots hold garbage in vLLM: it must never be read.
    for r, s in enumerate(batch.seq_lens):
        last_page = int(paged.block_table[r, (s - 1) // page_size])
        paged.key_cache[last_page, (s - 1) % page_size + 1 :] = float("nan")
        paged.value_cache[last_page, (s - 1) % page_size + 1 :] = float("nan")
    config = _config(tau=0.8)
    plan = plan_prefill(query, kv, batch, config, config.for_layer(0), scale=0.25)
    paged_plan = plan_prefill(query, paged, batch, config, config.for_layer(0), scale=0.25)
    assert torch.equal(plan.indices, paged_plan.indices)
    out = sparse_attention(query, paged, batch, paged_plan, 0.25)
    assert torch.equal(out, sparse_attention(query, kv, batch, plan, 0.25))


def test_future_tokens_never_leak() -> None:
    query, kv, batch = random_batch([150], [0], 4, 2, 16, seed=5)
    config = _config(tau=0.6)
    plan = plan_prefill(query, kv, batch, config, config.for_layer(0), scale=0.25)
    out = sparse_attention(query, kv, batch, plan, 0.25)
    # Changing token 100's key/value (and everything after) may not change rows before it.
    keys, values = kv.keys.clone(), kv.values.clone()
    keys[100:] = 1e3
    values[100:] = -1e3
    changed = ContiguousKV(keys, values, kv.seq_start)
    plan2 = plan_prefill(query, changed, batch, config, config.for_layer(0), scale=0.25)
    out2 = sparse_attention(query, changed, batch, plan2, 0.25)
    assert torch.equal(out[:100], out2[:100])
    assert not torch.equal(out[100:], out2[100:])


def test_gqa_heads_share_their_group_selection() -> None:
    query, kv, batch = random_batch([256], [0], 8, 2, 16, seed=7)
    config = _config(tau=0.5)
    plan = plan_prefill(query, kv, batch, config, config.for_layer(0), scale=0.25)
    assert plan.counts.shape[0] == 2  # c_h defaults to the group: one plan per KV head
    out = sparse_attention(query, kv, batch, plan, 0.25)
    mask = plan.block_mask(0, 4)
    k, v = kv.keys_values(0, 256)
    for h in range(8):
        kv_head = h // 4
        token_mask = mask[kv_head][torch.arange(256) // 64][:, torch.arange(256) // 64]
        token_mask &= torch.arange(256)[None, :] <= torch.arange(256)[:, None]
        expected = torch.nn.functional.scaled_dot_product_attention(
            query[:, h].T[None].transpose(1, 2),
            k[:, kv_head][None],
            v[:, kv_head][None],
            attn_mask=token_mask,
            scale=0.25,
        )[0]
        assert relative_error(out[:, h], expected) < 1e-10


def test_head_pooling_finer_than_group() -> None:
    query, kv, batch = random_batch([256], [0], 8, 2, 16, seed=8)
    config = _config(tau=0.5, c_h=2)
    plan = plan_prefill(query, kv, batch, config, config.for_layer(0), scale=0.25)
    assert plan.counts.shape[0] == 4 and plan.heads_per_selection == 2
    with pytest.raises(ValueError, match="c_h = 3"):
        plan_prefill(query, kv, batch, _config(c_h=3), _config().for_layer(0), scale=0.25)


@pytest.mark.parametrize("max_mix", [0.0, 0.4, 1.0])
def test_block_mass_matches_brute_force_composites(max_mix: float) -> None:
    query, kv, _ = random_batch([100], [90], 4, 2, 8, seed=11)
    keys, _ = kv.keys_values(0, 190)
    mass = block_mass(
        query, keys, 90, block_size=32, c_q=8, c_k=8, c_h=2, scale=0.3, max_mix=max_mix
    )
    # Brute force: explicit composite lists, aligned to absolute positions.
    q_groups = [list(range(max(90, g), min(190, g + 8))) for g in range(88, 190, 8)]
    k_groups = [list(range(g, min(190, g + 8))) for g in range(0, 190, 8)]
    assert mass.shape == (2, 4, 6)  # query blocks 2..5, key blocks 0..5
    for s in range(2):
        kv_head = s * 2 // 2
        expected = torch.zeros(4, 6, dtype=torch.float64)
        peak = torch.zeros(4, 6, dtype=torch.float64)
        per_block = torch.zeros(4, dtype=torch.float64)
        for qg in q_groups:
            qc = query[[p - 90 for p in qg]][:, 2 * s : 2 * s + 2].mean(dim=(0, 1))
            visible = [kg for kg in k_groups if kg[0] <= qg[-1]]
            logits = torch.stack([qc @ keys[kg, kv_head].mean(0) * 0.3 for kg in visible])
            probs = torch.softmax(logits, 0)
            row = qg[-1] // 32 - 2
            per_block[row] += 1
            for kg, p in zip(visible, probs, strict=True):
                expected[row, kg[0] // 32] += p
                peak[row, kg[0] // 32] = max(peak[row, kg[0] // 32], p)
        mean = expected / per_block[:, None]
        peak = peak / peak.sum(-1, keepdim=True)
        torch.testing.assert_close(mass[s], (1 - max_mix) * mean + max_mix * peak)
    torch.testing.assert_close(mass.sum(-1), torch.ones(2, 4, dtype=torch.float64))


def test_one_token_composites_give_the_exact_block_mass() -> None:
    # c_q = c_k = c_h = 1 is the oracle the benchmarks bound every estimator with: each
    # query's exact softmax mass per key block, averaged over the query block.
    from unisparse_vllm.core import exact_key_block_probs

    query, kv, _ = random_batch([100], [90], 4, 2, 8, seed=5)
    keys, _ = kv.keys_values(0, 190)
    mass = block_mass(query, keys, 90, block_size=32, c_q=1, c_k=1, c_h=1, scale=0.3)
    probs = exact_key_block_probs(query, keys, 90, 32, 0.3)  # [Hq, tokens, key blocks]
    row = torch.arange(90, 190) // 32 - 2
    summed = torch.zeros(4, 4, 6, dtype=torch.float64).index_add_(1, row, probs)
    torch.testing.assert_close(mass, summed / torch.bincount(row)[None, :, None])


def test_composites_use_true_counts_for_partial_groups() -> None:
    x = torch.arange(10, dtype=torch.float64)[:, None, None].expand(10, 2, 1)
    pooled, first, last = composite_queries(x, first_pos=5, c_q=4, c_h=1)
    # positions 5..14 -> groups [5..7], [8..11], [12..14]
    assert first.tolist() == [5, 8, 12] and last.tolist() == [7, 11, 14]
    torch.testing.assert_close(pooled[0, :, 0], torch.tensor([1.0, 4.5, 8.0], dtype=torch.float64))
    keys, key_first = composite_keys(x[:6], c_k=4)
    assert key_first.tolist() == [0, 4]
    torch.testing.assert_close(keys[0, :, 0], torch.tensor([1.5, 4.5], dtype=torch.float64))


def test_topk_mode_keeps_a_fixed_fraction() -> None:
    mass = torch.rand(2, 3, 20)
    config = _config(mode="topk", density=0.3, sink_blocks=1, local_blocks=1)
    counts, _ = select_blocks(mass, torch.tensor([19, 9, 0]), config.for_layer(0))
    assert counts.tolist() == [[6, 3, 1], [6, 3, 1]]


def test_min_and_max_blocks_bound_top_p() -> None:
    mass = torch.zeros(1, 1, 16)
    mass[0, 0, 5] = 1.0  # all mass in one block: top-p alone would take sink, diagonal, 5
    row = torch.tensor([15])
    budget = _config(tau=0.9, min_blocks=6).for_layer(0)
    assert select_blocks(mass, row, budget)[0].item() == 6
    budget = _config(tau=0.9, max_blocks=2).for_layer(0)
    counts, indices = select_blocks(mass, row, budget)
    assert counts.item() == 2 and indices[0, 0, :2].tolist() == [0, 15]


def test_layers_of_a_step_share_its_row_tables() -> None:
    """The per-step tables are built once and shared by the step's layers: a dense layer in
    between neither rebuilds nor alters them, and every sparse layer plans the same way."""
    from unisparse_vllm.core.plan import step_rows

    query, kv, batch = random_batch([300, 200], [0, 100], 2, 1, 8, seed=3)
    config = _config(tau=0.3, dense_layers=[1])
    step_rows.cache_clear()
    first = plan_prefill(query, kv, batch, config, config.for_layer(0), scale=0.25)
    dense = plan_prefill(query, kv, batch, config, config.for_layer(1), scale=0.25)
    again = plan_prefill(query, kv, batch, config, config.for_layer(0), scale=0.25)
    assert (step_rows.cache_info().misses, step_rows.cache_info().hits) == (1, 2)
    assert dense.density() == 1.0 and first.density() < 1.0
    assert torch.equal(first.counts, again.counts) and torch.equal(first.indices, again.indices)


def test_dense_fallbacks() -> None:
    query, kv, batch = random_batch([300, 300], [0, 0], 2, 1, 8, seed=2)
    config = _config(tau=0.3, min_sparse_tokens=301, dense_layers=[3], dense_tail_blocks=2)
    plan = plan_prefill(query, kv, batch, config, config.for_layer(0), scale=0.25)
    assert plan.density() == 1.0, "requests shorter than min_sparse_tokens stay dense"
    config = _config(tau=0.3, dense_layers=[3], dense_tail_blocks=2)
    plan = plan_prefill(query, kv, batch, config, config.for_layer(3), scale=0.25)
    assert plan.density() == 1.0, "dense layer"
    plan = plan_prefill(query, kv, batch, config, config.for_layer(0), scale=0.25)
    full = plan.row_block + 1
    tail = plan.row_block >= 3  # 300 tokens = key blocks 0..4: the last two are the tail
    assert torch.equal(plan.counts[0][tail], full[tail])
    assert (plan.counts[0][~tail] < full[~tail]).any()


def test_every_chunk_of_a_long_prompt_is_sparse_and_only_its_end_is_dense() -> None:
    """Routing by the prompt's length, not the chunk's: a first chunk shorter than
    ``min_sparse_tokens`` of a long prompt is estimated, and its last block is not the
    prompt's dense tail. Without the prompt length it falls back to the chunk (dense)."""
    query, kv, batch = random_batch([256], [0], 4, 2, 16, seed=10)
    config = resolve_config({"block_size": 64, "c_q": 8, "c_k": 8, "min_sparse_tokens": 512})
    budget = config.for_layer(0).model_copy(update={"mode": "topk", "density": 0.3})
    chunk_only = plan_prefill(query, kv, batch, config, budget, scale=0.25)
    causal = (chunk_only.row_block + 1)[None].expand_as(chunk_only.counts)
    assert torch.equal(chunk_only.counts, causal)  # a 256-token "prompt": dense
    first_chunk = plan_prefill(query, kv, batch, config, budget, scale=0.25, prompt_lens=(1024,))
    assert (first_chunk.counts[:, -1] < 4).all()  # its last block is sparse, no dense tail
    assert first_chunk.density() < 1.0


def test_each_request_is_planned_with_its_own_budget() -> None:
    """Per-request budgets (length tiers): a batch's plan holds, row for row, what each
    request planned alone with its budget holds, a dense budget included."""
    query, kv, batch = random_batch([300, 200, 250], [0, 100, 0], 4, 2, 16, seed=5)
    config = _config()
    low, high = (config.for_layer(0).model_copy(update={"tau": t}) for t in (0.3, 0.9))
    dense = config.for_layer(0).model_copy(update={"dense": True})
    plan = plan_prefill(query, kv, batch, config, (low, high, dense), scale=0.25)
    for r, budget in enumerate((low, high, dense)):
        alone = plan_prefill(
            query[batch.query_slice(r)],
            ContiguousKV(kv.keys, kv.values, (kv.seq_start[r],)),
            PrefillBatch.from_lens([batch.query_lens[r]], [batch.context_lens[r]]),
            config,
            budget,
            scale=0.25,
        )
        rows = plan.row_request == r
        assert torch.equal(plan.counts[:, rows], alone.counts)
        assert torch.equal(plan.indices[:, rows, : alone.indices.shape[2]], alone.indices)
    causal = (plan.row_block + 1)[None].expand_as(plan.counts)
    counts = [plan.counts[:, plan.row_request == r] for r in range(3)]
    assert (counts[0] < causal[:, plan.row_request == 0]).any()  # tau 0.3 is sparse
    assert counts[0].sum() < counts[1].sum()  # tau 0.9 takes more
    assert torch.equal(counts[2], causal[:, plan.row_request == 2])  # dense
    with pytest.raises(ValueError, match="2 budgets for a batch of 3 requests"):
        plan_prefill(query, kv, batch, config, (low, high), scale=0.25)
