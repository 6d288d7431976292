"""Triton kernels against the core reference: under TRITON_INTERPRET=1 on the CPU (CI), and
compiled on a GPU. Fresh random inputs, shuffled pages, poisoned outputs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_batch

from unisparse_vllm import kernels
from unisparse_vllm.config import resolve_config
from unisparse_vllm.core import num_key_blocks, plan_prefill, relative_error, sparse_attention

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Interpreter sizes on the CPU; real sizes on a GPU.
SCALE = 16 if DEVICE == "cuda" else 1


@pytest.fixture(autouse=True)
def force_triton():
    kernels.use("triton")
    yield
    kernels.use(None)


CASES = [
    # query_lens, context_lens, Hq, Hkv, head_dim, block, page, dtype, c_h
    ([300], [0], 4, 2, 64, 64, 16, torch.float32, None),
    ([130, 70], [64, 200], 4, 1, 32, 64, 32, torch.float16, None),
    ([200], [100], 2, 2, 80, 64, 16, torch.float32, None),  # head dim not a power of two
    ([260], [0], 2, 1, 64, 128, 16, torch.float16, None),
    ([280], [40], 6, 2, 32, 64, 16, torch.float32, 1),  # one selection per query head
    ([200], [130], 4, 2, 64, 64, 128, torch.float16, None),  # pages larger than blocks
    ([150], [40], 2, 1, 32, 128, 8, torch.float32, None),  # pages smaller than c_k
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"q{c[0]}-c{c[1]}-h{c[2]}/{c[3]}-d{c[4]}-B{c[5]}-ch{c[8]}"
)
@pytest.mark.parametrize("tau", [0.6, 1.0])
def test_sparse_attention_matches_reference(case, tau: float) -> None:
    query_lens, context_lens, hq, hkv, dim, block, page, dtype, c_h = case
    query_lens = [n * SCALE for n in query_lens]
    context_lens = [c * SCALE for c in context_lens]
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh inputs each run, reported on failure
    query, kv, batch = random_batch(query_lens, context_lens, hq, hkv, dim, dtype=dtype, seed=seed)
    paged = kv.to_paged(batch, page, torch.Generator().manual_seed(seed))
    query = query.to(DEVICE)
    paged = type(paged)(
        *(t.to(DEVICE) for t in (paged.key_cache, paged.value_cache, paged.block_table))
    )
    config = resolve_config(
        {"block_size": block, "c_q": 16, "c_k": 16, "c_h": c_h, "tau": tau, "min_sparse_tokens": 0}
    )
    scale = 1 / math.sqrt(dim)
    plan = plan_prefill(query, paged, batch, config, config.for_layer(0), scale=scale)
    expected = sparse_attention(query, paged, batch, plan, scale)
    out = torch.full_like(query, float("nan"))  # poisoned: every element must be written
    kernels.sparse_attention(query, paged, batch, plan, scale, out=out)
    assert not out.isnan().any(), f"unwritten outputs (seed {seed})"
    tolerance = 2e-3 if dtype == torch.float16 else 1e-4
    assert relative_error(out, expected) < tolerance, f"seed {seed}"


MASS_CASES = [
    # query_lens, context_lens, estimated, Hq, Hkv, head_dim, block, c_q, c_k, c_h, max_mix
    ([300], [0], [True], 4, 2, 64, 64, 16, 16, None, 0.0),
    ([150, 90, 200], [40, 0, 130], [True, False, True], 4, 1, 32, 64, 8, 16, 2, 0.0),
    ([520], [0], [True], 2, 2, 80, 128, 16, 32, None, 0.0),
    ([400], [120], [True], 4, 2, 64, 128, 4, 16, 1, 0.0),  # finer queries (the c_q 4 lead)
    ([300], [100], [True], 4, 2, 32, 128, 1, 1, 1, 0.0),  # one token a composite: the oracle
    ([150, 90, 200], [40, 0, 130], [True, False, True], 4, 2, 32, 64, 8, 16, 1, 0.5),
]


@pytest.mark.parametrize("case", MASS_CASES)
def test_block_mass_kernel_matches_reference(case) -> None:
    from unisparse_vllm.core import batch_block_mass
    from unisparse_vllm.kernels.estimate import batch_block_mass as fused_block_mass

    query_lens, context_lens, estimated, hq, hkv, dim, block, c_q, c_k, c_h, max_mix = case
    query_lens = [n * SCALE for n in query_lens]
    context_lens = [c * SCALE for c in context_lens]
    seed = int(torch.randint(0, 2**31 - 1, ()))
    query, kv, batch = random_batch(
        query_lens, context_lens, hq, hkv, dim, dtype=torch.float32, seed=seed
    )
    paged = kv.to_paged(batch, 16, torch.Generator().manual_seed(seed))
    query = query.to(DEVICE)
    paged = type(paged)(
        *(t.to(DEVICE) for t in (paged.key_cache, paged.value_cache, paged.block_table))
    )
    config = resolve_config(
        {"block_size": block, "c_q": c_q, "c_k": c_k, "c_h": c_h, "max_mix": max_mix}
    )
    c_h = config.heads_per_selection(hq, hkv)
    args = dict(config=config, c_h=c_h, scale=1 / math.sqrt(dim))
    expected = batch_block_mass(query, paged, batch, estimated, **args)
    got = fused_block_mass(query, paged, batch, estimated, **args)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4, msg=f"seed {seed}")


@pytest.mark.parametrize("page,per_request", [(8, False), (16, False), (128, False), (16, True)])
def test_plan_through_the_fused_estimator_matches_the_reference_plan(
    page: int, per_request: bool
) -> None:
    """Request 0's chunk is the start of a longer prompt: its rows have no dense tail, request
    1's end theirs. ``per_request``: each request with its own budget (length tiers)."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    query, kv, batch = random_batch(
        [260 * SCALE, 130 * SCALE], [0, 70 * SCALE], 4, 2, 32, dtype=torch.float32, seed=seed
    )
    paged = kv.to_paged(batch, page, torch.Generator().manual_seed(seed))
    query = query.to(DEVICE)
    paged = type(paged)(
        *(t.to(DEVICE) for t in (paged.key_cache, paged.value_cache, paged.block_table))
    )
    config = resolve_config({"block_size": 64, "tau": 0.7, "min_sparse_tokens": 0})
    prompts = (batch.seq_lens[0] + 500, batch.seq_lens[1])
    budget = config.for_layer(0)
    if per_request:
        budget = (budget, budget.model_copy(update={"tau": 0.4}))
    fused, reference = (
        plan(query, paged, batch, config, budget, scale=0.2, prompt_lens=prompts)
        for plan in (kernels.plan_prefill, plan_prefill)
    )
    width = max(num_key_blocks(s, 64) for s in batch.seq_lens)
    masks = [
        (fused.block_mask(r, width), reference.block_mask(r, width))
        for r in range(batch.num_requests)
    ]
    differing = sum(int((a != b).sum()) for a, b in masks)
    total = sum(a.numel() for a, _ in masks)
    # fp32 sums in another order may flip a block sitting exactly at the tau boundary
    assert differing <= max(1, total // 100), f"seed {seed}: {differing} of {total} differ"


def test_fused_estimator_tables_are_built_once_per_step() -> None:
    """Two layers of one step (other queries and keys, same batch): the second reuses the
    first's index tables and still computes its own block mass."""
    from unisparse_vllm.kernels.estimate import batch_block_mass, index_tables

    batch_lens = ([200 * SCALE, 90 * SCALE], [0, 60 * SCALE])
    config = resolve_config({"block_size": 64, "min_sparse_tokens": 0})
    index_tables.cache_clear()
    for layer_seed in (1, 2):
        query, kv, batch = random_batch(*batch_lens, 4, 2, 32, dtype=torch.float32, seed=layer_seed)
        paged = kv.to_paged(batch, 16, torch.Generator().manual_seed(layer_seed))
        paged = type(paged)(
            *(t.to(DEVICE) for t in (paged.key_cache, paged.value_cache, paged.block_table))
        )
        args = (query.to(DEVICE), paged, batch, [True, True])
        fused = batch_block_mass(*args, config=config, c_h=2, scale=0.2)
        reference = kernels.core.batch_block_mass(*args, config=config, c_h=2, scale=0.2)
        torch.testing.assert_close(fused.cpu(), reference.cpu(), atol=1e-5, rtol=1e-4)
    assert (index_tables.cache_info().misses, index_tables.cache_info().hits) == (1, 1)


def test_bad_kernel_choice_names_the_variable(monkeypatch) -> None:
    kernels.use(None)
    monkeypatch.setenv("UNISPARSE_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"UNISPARSE_KERNELS must be one of .* got 'cuda'"):
        kernels.choice()
    with pytest.raises(ValueError, match="kernel choice must be one of"):
        kernels.use("fast")


SELECTIONS = [
    {"mode": "top_p", "tau": 0.5},
    {"mode": "top_p", "tau": 0.9, "sink_blocks": 2, "local_blocks": 3},
    {"mode": "top_p", "tau": 0.95, "min_blocks": 4, "max_blocks": 6},
    {"mode": "top_p", "tau": 1.0},
    {"mode": "topk", "density": 0.3},
    {"mode": "topk", "density": 0.05, "sink_blocks": 0, "local_blocks": 1},
    {"dense": True},
]


@pytest.mark.parametrize("budget", SELECTIONS, ids=lambda b: "-".join(f"{v}" for v in b.values()))
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_selection_kernel_matches_the_reference(budget: dict, ties: bool) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()))
    gen = torch.Generator().manual_seed(seed)
    heads, width = 2, 24 * SCALE
    query_block = torch.randint(0, width, (16 * SCALE,), generator=gen)
    raw = torch.rand(heads, len(query_block), width, generator=gen) ** 4
    if ties:  # a few distinct values (zeros included): the cut falls inside runs of equals
        raw = (raw * 4).floor() / 4
    causal = torch.arange(width)[None, :] <= query_block[:, None]
    mass = raw * causal
    mass = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
    dense_rows = torch.rand(len(query_block), generator=gen) < 0.1
    layer_budget = resolve_config({}).for_layer(0).model_copy(update=budget)
    expected = kernels.core.select_blocks(mass, query_block, layer_budget, dense_rows)
    counts, indices = kernels.select_blocks(
        mass.to(DEVICE), query_block.to(DEVICE), layer_budget, dense_rows.to(DEVICE)
    )
    counts, indices = counts.cpu(), indices.cpu()
    differing = ((counts != expected[0]) | (indices != expected[1]).any(-1)).nonzero().tolist()
    if budget.get("mode") != "top_p" or budget.get("tau") == 1.0:
        assert not differing, f"seed {seed}: rows {differing} differ"
    # top-p reads a cumulative sum, summed in another order here: a row may differ only where
    # the smaller selection's mass sits at tau (one block more or less, same blocks otherwise).
    for head, row in differing:
        h_r = (head, row)
        picks = [set(ix[h_r][: c[h_r]].tolist()) for c, ix in ((counts, indices), expected)]
        small, large = sorted(picks, key=len)
        assert small < large and len(large) == len(small) + 1, f"seed {seed}: {head, row}"
        at_cut = float(mass[head, row, sorted(small)].sum())
        assert abs(at_cut - budget["tau"]) < 1e-5, f"seed {seed}: {head, row} not at tau"


def _warm_up_for(config, hq: int, hkv: int, dim: int, dtype, max_seq_len: int) -> int:
    from unisparse_vllm.kernels.warmup import warm_up

    budgets = [config.for_layer(layer) for layer in range(4)]
    return warm_up(
        config,
        budgets,
        num_heads=hq,
        num_kv_heads=hkv,
        head_dim=dim,
        dtype=dtype,
        page_size=16,
        max_seq_len=max_seq_len,
        device=DEVICE,
    )


def test_warm_up_runs_each_distinct_sparse_budget_once() -> None:
    config = resolve_config(
        {
            "block_size": 64,
            "dense_layers": [0],
            "layer_overrides": [{"layers": ["2-3"], "mode": "topk", "density": 0.2}],
        }
    )
    # Layer 0 is dense (nothing to compile), layer 1 the default, layers 2 and 3 one top-k.
    assert _warm_up_for(config, 4, 2, 32, torch.float16, max_seq_len=2048) == 2
    assert (
        _warm_up_for(resolve_config({"dense_layers": ["0-3"]}), 4, 2, 32, torch.float16, 2048) == 0
    )


def _compiled_variants() -> dict[str, list[str]]:
    """Each kernel's compiled variants (their specialization keys)."""
    from unisparse_vllm.kernels import attention, estimate, flash, select

    jitted = [
        attention._sparse_attention_kernel,
        flash._virtual_tables_kernel,
        estimate._pool_keys_kernel,
        estimate._pool_queries_kernel,
        estimate._block_mass_kernel,
        select._select_kernel,
    ]
    return {
        k.fn.__name__: sorted(str(key) for cache in k.device_caches.values() for key in cache[0])
        for k in jitted
    }


@pytest.mark.skipif(DEVICE != "cuda", reason="Triton compiles on a GPU only")
def test_after_warm_up_no_step_compiles_a_kernel() -> None:
    """Steps of every shape class (one row, odd widths, chunks over odd contexts, several
    requests, tables of other widths) run only variants the warm-up compiled."""
    hq, hkv, dim, dtype = 8, 2, 128, torch.bfloat16
    config = resolve_config(
        {"min_sparse_tokens": 0, "layer_overrides": [{"layers": [1], "tau": 0.7}]}
    )
    _warm_up_for(config, hq, hkv, dim, dtype, max_seq_len=16384)
    before = _compiled_variants()
    steps = [
        ([1000], [0]),
        ([128], [0]),
        ([300, 2000], [130, 4000]),
        ([200, 640, 90], [0, 5000, 333]),  # tables of other lengths, other alignments
        ([777], [9001]),
        ([16384], [0]),
    ]
    for query_lens, context_lens in steps:
        query, kv, batch = random_batch(query_lens, context_lens, hq, hkv, dim, dtype=dtype)
        paged = kv.to_paged(batch, 16, torch.Generator().manual_seed(0))
        paged = type(paged)(
            *(t.to(DEVICE) for t in (paged.key_cache, paged.value_cache, paged.block_table))
        )
        query = query.to(DEVICE)
        for layer in range(2):
            budget = config.for_layer(layer)
            plan = kernels.plan_prefill(query, paged, batch, config, budget, scale=0.1)
            kernels.sparse_attention(query, paged, batch, plan, 0.1)
    torch.cuda.synchronize()
    after = _compiled_variants()
    new = {name: sorted(set(after[name]) - set(keys)) for name, keys in before.items()}
    assert not any(new.values()), new


@pytest.mark.skipif(DEVICE != "cuda", reason="the host waits for a GPU only")
def test_a_triton_step_after_the_first_layer_makes_the_host_wait_for_nothing() -> None:
    """Plan and Triton attention of a layer, once the step's tables exist (the first layer
    copies them to the device), run with no device-to-host sync: the host can queue the
    next layers while the GPU works (RESULTS.md section 4, host overhead)."""
    config = resolve_config({"min_sparse_tokens": 0})
    query, kv, batch = random_batch([3000], [2000], 8, 2, 128, dtype=torch.bfloat16)
    paged = kv.to_paged(batch, 16, torch.Generator().manual_seed(0))
    paged = type(paged)(
        *(t.to(DEVICE) for t in (paged.key_cache, paged.value_cache, paged.block_table))
    )
    query = query.to(DEVICE)
    kernels.use("triton")
    try:
        for layer in range(2):  # the first builds (and caches) the step's tables
            if layer:
                torch.cuda.set_sync_debug_mode("error")
            plan = kernels.plan_prefill(
                query, paged, batch, config, config.for_layer(layer), scale=0.1
            )
            plan.selected_blocks()
            kernels.sparse_attention(query, paged, batch, plan, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        kernels.use(None)
