"""Backend pieces against hand-built batches: metadata slicing, cache writes, registration."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch

from unisparse_vllm.backend.common import count_leading_decodes, layer_index, prefill_work
from unisparse_vllm.backend.compat import split_kv_cache


def test_prefill_work_after_decodes() -> None:
    # 2 decodes, then a chunk of 5 over 11 cached tokens, then a fresh prompt of 7.
    query_start = torch.tensor([0, 1, 2, 7, 14])
    seq_lens = torch.tensor([30, 9, 16, 7])
    block_table = torch.arange(16).view(4, 4)
    decodes = count_leading_decodes(query_start)
    assert decodes == 2
    work = prefill_work(query_start, seq_lens, block_table, decodes, min_sparse_tokens=10)
    assert work is not None
    assert (work.first_request, work.first_token) == (2, 2)
    assert work.batch.query_lens == (5, 7) and work.batch.context_lens == (11, 0)
    assert work.token_slice == slice(2, 14)
    assert torch.equal(work.block_table, block_table[2:])
    assert work.long_requests == 1  # only the 16-token request reaches min_sparse_tokens
    assert prefill_work(query_start, seq_lens, block_table, 4, 10) is None


def _runner_noting_steps(monkeypatch, version: str, prompts, computed):
    """A stand-in for vLLM's model runner ``version`` (its rows: prompt lengths and tokens
    computed before the step, in batch order), wrapped as ``compat.track_prompt_lengths``
    wraps the real one; its metadata method builds the step's ``PrefillWork``."""
    from dataclasses import dataclass

    import numpy as np

    from unisparse_vllm.backend import compat

    monkeypatch.setattr(compat, "_step_rows", None)
    (_, _, method, rows_of) = next(r for r in compat._RUNNERS if r[0].endswith(version))

    @dataclass
    class InputBatch:  # the V2 runner's, made per step
        prefill_len_np: np.ndarray
        num_computed_tokens_np: np.ndarray

    class Rows:  # the first runner's, updated in place
        num_prompt_tokens = np.array(prompts)
        num_computed_tokens_cpu = np.array(computed)

    class Runner:
        input_batch = Rows()

    def metadata(self, *step, work):
        return prefill_work(*work)

    setattr(Runner, method, metadata)
    compat.note_steps(Runner, method, rows_of)
    runner = Runner()
    batch = InputBatch(np.array(prompts), np.array(computed))
    step = (batch,) if version == "gpu.model_runner" else ()
    return lambda *work: getattr(runner, method)(*step, work=work)


@pytest.mark.parametrize("version", ["gpu_model_runner", "gpu.model_runner"])
def test_prefill_work_routes_by_the_prompt_length_the_runner_tells(monkeypatch, version) -> None:
    """The same step as above, with the model runner's rows noted (either runner): the
    5-token chunk over 11 cached tokens is the start of a 40-token prompt (long), the fresh
    7 of a 7-token one. Rows that do not match the step's (computed + chunk != sequence) are
    not trusted."""
    from unisparse_vllm.backend import compat

    query_start = torch.tensor([0, 1, 2, 7, 14])
    seq_lens = torch.tensor([30, 9, 16, 7])
    step = _runner_noting_steps(monkeypatch, version, [20, 8, 40, 7], [29, 8, 11, 0])
    work = step(query_start, seq_lens, torch.arange(16).view(4, 4), 2, 10)
    assert work is not None and work.prompt_lens == (40, 7)
    assert work.long_requests == 1 and work.long_prefill_tokens == (5, 0)
    no_tail = step(query_start, seq_lens, torch.arange(16).view(4, 4), 2, 30)
    assert no_tail is not None and no_tail.long_requests == 1  # 40 >= 30; the chunk's 16 is not
    said: list[str] = []
    monkeypatch.setattr(compat, "_reported_unknown", False)
    monkeypatch.setattr(compat.logger, "info", lambda msg, *args: said.append(msg % args))
    step = _runner_noting_steps(monkeypatch, version, [20, 8, 40, 7], [29, 8, 10, 0])
    for _ in range(2):  # another step's rows
        stale = step(query_start, seq_lens, torch.arange(16).view(4, 4), 2, 30)
        assert stale is not None and stale.prompt_lens is None and stale.long_requests == 0
    assert len(said) == 1, "said once per process, counted every step"
    assert "computed [10, 0] + scheduled [5, 7] != sequence lengths [16, 7]" in said[0]


def test_prompt_lengths_are_tracked_in_every_loaded_runner(monkeypatch) -> None:
    """Both of vLLM's model runners, where their modules are loaded, wrapped once each."""
    import sys
    import types

    from unisparse_vllm.backend import compat

    runners = {}
    for module_name, class_name, method, _ in compat._RUNNERS:
        runner = type(class_name, (), {method: lambda self, *a, **k: "built"})
        module = types.ModuleType(module_name)
        setattr(module, class_name, runner)
        monkeypatch.setitem(sys.modules, module_name, module)
        runners[method] = runner
    compat.track_prompt_lengths()
    compat.track_prompt_lengths()
    for method, runner in runners.items():
        wrapped = getattr(runner, method)
        assert wrapped._unisparse_tracked and not hasattr(wrapped.__wrapped__, "__wrapped__")


def test_tokens_routed_without_prompt_lengths_are_counted(monkeypatch) -> None:
    """Operators see how much of the prefill was routed by chunk ends (the runner did not
    give prompt lengths) in the counters, not only in a one-time log line."""
    import numpy as np

    from unisparse_vllm.backend import compat
    from unisparse_vllm.backend.common import prefill_work
    from unisparse_vllm.backend.stats import STATS

    layer = _sparse_layer(monkeypatch, tau=0.5)
    kv_cache = torch.randn(20, 2, 16, 32)
    query = torch.randn(300, 4 * 16)

    rows = (np.array([300]), np.array([0]))  # the runner's: prompt lengths, computed before
    for told, expected in ((False, 300), (True, 0)):
        monkeypatch.setattr(compat, "_step_rows", (lambda: rows) if told else None)
        work = prefill_work(
            torch.tensor([0, 300]), torch.tensor([300]), torch.arange(20).view(1, 20), 0, 0
        )
        name = f"model.layers.1.attn.told{told}"
        layer.forward(name, query, kv_cache, work, torch.empty_like(query), run_dense=list)
        counters = STATS.layers[name]
        assert counters.sparse_prefill_tokens == 300
        assert counters.prompt_length_unknown_tokens == expected


def test_all_decodes_and_all_prefills() -> None:
    assert count_leading_decodes(torch.tensor([0, 1, 2, 3])) == 3
    assert count_leading_decodes(torch.tensor([0, 4, 5])) == 0


def test_layer_index() -> None:
    assert layer_index("model.layers.12.self_attn.attn") == 12
    assert layer_index("language_model.model.layers.0.self_attn.attn") == 0
    with pytest.raises(ValueError, match="no_index"):
        layer_index("no_index.attn")


def test_split_kv_cache_views_the_packed_layout() -> None:
    kv_cache = torch.randn(3, 2, 16, 2 * 8)  # [pages, Hkv, page, 2*d]
    keys, values = split_kv_cache(kv_cache, 8)
    assert keys.shape == values.shape == (3, 16, 2, 8)
    assert torch.equal(keys[1, 5, 1], kv_cache[1, 1, 5, :8])
    assert torch.equal(values[2, 0, 0], kv_cache[2, 0, 0, 8:])
    keys[0, 0, 0] = 7.0  # a view, not a copy
    assert (kv_cache[0, 0, 0, :8] == 7.0).all()


vllm = pytest.importorskip("vllm")


def test_cache_update_writes_through_slot_mapping(monkeypatch) -> None:
    from unisparse_vllm.backend import cpu

    monkeypatch.setattr(cpu, "SparsePrefillLayer", lambda *args: None)
    impl = cpu.UniSparseCPUImpl(4, 8, 0.3, 2, None, None, "auto")
    kv_cache = torch.zeros(4, 2, 16, 16)
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([17, -1, 63])  # page 1 slot 1; padding; page 3 slot 15
    impl.do_kv_cache_update(None, key, value, kv_cache, slots)
    keys, values = split_kv_cache(kv_cache, 8)
    assert torch.equal(keys[1, 1], key[0]) and torch.equal(values[3, 15], value[2])
    assert int((kv_cache != 0).sum()) == 2 * 2 * 2 * 8


def test_cpu_impl_refuses_unsupported_layers(monkeypatch) -> None:
    from unisparse_vllm.backend import cpu

    with pytest.raises(NotImplementedError, match="sliding window 128"):
        cpu.UniSparseCPUImpl(4, 8, 0.3, 2, None, 128, "auto")


def test_registration_pickles_by_name_and_routes_only_unisparse() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import unisparse_vllm

    unisparse_vllm.register()
    unisparse_vllm.register()  # idempotent: vLLM loads plugins in every process
    member = AttentionBackendEnum["UNISPARSE"]
    assert pickle.loads(pickle.dumps(member)) is member
    assert (
        pickle.loads(pickle.dumps(AttentionBackendEnum.CPU_ATTN)) is AttentionBackendEnum.CPU_ATTN
    )
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("CPU routing is installed on the CPU platform only (pickling checked)")
    from vllm.v1.attention.selector import AttentionSelectorConfig

    selector = AttentionSelectorConfig(
        head_size=64, dtype=torch.float32, kv_cache_dtype=None, block_size=16
    )
    routed = CpuPlatform.get_attn_backend_cls(member, selector)
    assert routed == "unisparse_vllm.backend.cpu.UniSparseCPUBackend"
    default = CpuPlatform.get_attn_backend_cls(None, selector)
    assert default == AttentionBackendEnum.CPU_ATTN.get_path()


def test_a_fresh_process_unpickles_the_member_before_plugins_load() -> None:
    """The spawn trap: engine processes unpickle VllmConfig before loading plugins."""
    import subprocess
    import sys

    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import unisparse_vllm

    unisparse_vllm.register()
    payload = pickle.dumps({"backend": AttentionBackendEnum["UNISPARSE"]})
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read())['backend'].name)",
        ],
        input=payload,
        capture_output=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    assert child.stdout.decode().split()[-1] == "UNISPARSE"


def test_slice_requests_rebases_tokens_and_keeps_request_rows() -> None:
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from unisparse_vllm.backend.common import slice_requests, sparse_unsupported

    query_start = torch.tensor([0, 1, 2, 7, 14], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=query_start.clone(),
        query_start_loc_cpu=query_start,
        seq_lens=torch.tensor([30, 9, 16, 7]),
        num_reqs=4,
        num_actual_tokens=14,
        max_query_len=7,
        max_seq_len=30,
        block_table_tensor=torch.arange(16).view(4, 4),
        slot_mapping=torch.arange(100, 114),
        positions=torch.arange(14),
        seq_lens_cpu_upper_bound=torch.tensor([30, 9, 16, 7]),
    )
    assert sparse_unsupported(cm) is None
    prefill = slice_requests(cm, 2, 4)
    assert prefill.query_start_loc.tolist() == [0, 5, 12]
    assert prefill.query_start_loc_cpu.tolist() == [0, 5, 12]
    assert (prefill.num_reqs, prefill.num_actual_tokens, prefill.max_query_len) == (2, 12, 7)
    assert prefill.seq_lens.tolist() == [16, 7] and prefill.max_seq_len == 16
    assert torch.equal(prefill.block_table_tensor, cm.block_table_tensor[2:])
    assert prefill.slot_mapping.tolist() == list(range(102, 114))
    assert prefill.positions.tolist() == list(range(2, 14))
    decode = slice_requests(cm, 0, 2)
    assert decode.query_start_loc.tolist() == [0, 1, 2] and decode.slot_mapping.tolist() == [
        100,
        101,
    ]
    cm.causal = False
    assert sparse_unsupported(cm) is not None


def _sparse_layer(monkeypatch, **inline):
    from unisparse_vllm.backend import common
    from unisparse_vllm.config import resolve_config

    config = resolve_config(
        {"block_size": 64, "c_q": 8, "c_k": 8, "min_sparse_tokens": 0, **inline}
    )
    monkeypatch.setattr(common, "engine_config", lambda: config)
    return common.SparsePrefillLayer(4, 2, 16, 0.25)


@pytest.mark.parametrize("threshold,expect_dense", [(None, False), (0.99, False), (0.05, True)])
def test_dense_above_density_falls_back(monkeypatch, threshold, expect_dense) -> None:
    from unisparse_vllm.backend.common import prefill_work
    from unisparse_vllm.backend.stats import STATS

    layer = _sparse_layer(monkeypatch, tau=0.5, dense_above_density=threshold)
    kv_cache = torch.randn(20, 2, 16, 32)  # 20 pages of 16 tokens, head_dim 16
    query = torch.randn(300, 4 * 16)
    output = torch.full_like(query, float("nan"))
    work = prefill_work(
        torch.tensor([0, 300]), torch.tensor([300]), torch.arange(20).view(1, 20), 0, 0
    )
    calls = []
    name = f"model.layers.1.attn.threshold{threshold}"
    layer.forward(name, query, kv_cache, work, output, run_dense=lambda: calls.append(1))
    assert bool(calls) == expect_dense
    counters = STATS.layers[name]
    if expect_dense:
        assert output.isnan().all() and counters.sparse_prefill_tokens == 0
    else:
        assert not output.isnan().any() and counters.sparse_prefill_tokens == 300
        assert counters.mean_density < 1.0


def test_each_request_takes_the_budget_of_its_prompts_length_tier(monkeypatch) -> None:
    """Layer 1 is dense for prompts under 400 tokens and sparse from there: a 300-token
    prompt's step stays dense, a 300-token chunk of a longer prompt runs sparse."""
    import dataclasses

    from unisparse_vllm.backend.common import prefill_work
    from unisparse_vllm.backend.stats import STATS

    tier = {"min_prompt_tokens": 400, "layer_overrides": [{"layers": [1], "dense": False}]}
    layer = _sparse_layer(monkeypatch, tau=0.5, dense_layers=[1], length_tiers=[tier])
    kv_cache = torch.randn(20, 2, 16, 32)
    chunk = prefill_work(
        torch.tensor([0, 300]), torch.tensor([300]), torch.arange(20).view(1, 20), 0, 0
    )
    name = "model.layers.1.attn.tiers"
    short, long = (dataclasses.replace(chunk, prompt_lens=(n,)) for n in (300, 1000))
    assert [b.dense for b in layer.budgets(name, short)] == [True]
    assert layer.is_dense(name, short) and not layer.is_dense(name, long)
    query = torch.randn(300, 4 * 16)
    output = torch.full_like(query, float("nan"))
    layer.forward(name, query, kv_cache, long, output, run_dense=lambda: None)
    assert not output.isnan().any()
    assert STATS.layers[name].sparse_prefill_tokens == 300
    assert STATS.layers[name].mean_density < 1.0
    # One step with both: the long prompt's rows sparse, the short one's dense, and counted so.
    both = prefill_work(
        torch.tensor([0, 300, 400]), torch.tensor([300, 100]), torch.arange(40).view(2, 20), 0, 0
    )
    both = dataclasses.replace(both, prompt_lens=(1000, 100))
    query = torch.randn(400, 4 * 16)
    mixed = "model.layers.1.attn.tiers_mixed"
    layer.forward(mixed, query, torch.randn(40, 2, 16, 32), both, query.clone(), lambda: None)
    counters = STATS.layers[mixed]
    assert (counters.sparse_prefill_tokens, counters.dense_prefill_tokens) == (300, 100)


def test_the_attention_that_runs_is_logged_once_with_why_not_fa3(monkeypatch) -> None:
    from unisparse_vllm.backend import common

    layer = _sparse_layer(monkeypatch, tau=0.5, dense_above_density=None)
    monkeypatch.setattr(common, "_LOGGED_ATTENTION", set())
    lines = []
    monkeypatch.setattr(common.logger, "info", lambda msg, *args: lines.append(msg % args))
    kv_cache = torch.randn(20, 2, 16, 32)
    work = common.prefill_work(
        torch.tensor([0, 300]), torch.tensor([300]), torch.arange(20).view(1, 20), 0, 0
    )
    for step in range(2):
        layer.forward(
            f"model.layers.{step}.attn.logged",
            torch.randn(300, 4 * 16),
            kv_cache,
            work,
            torch.empty(300, 4 * 16),
            run_dense=lambda: None,
        )
    assert [line for line in lines if "prefill attention runs" in line] == [
        "UniSparse: sparse prefill attention runs on the reference kernel "
        "(FA3 not used: FA3 takes fp16/bf16 queries and caches, "
        "got torch.float32 and torch.float32)"
    ]


def test_counters_count_prefill_tokens_only(monkeypatch) -> None:
    """A CPU batch holds decodes too: they are neither sparse nor dense prefill tokens."""
    from unisparse_vllm.backend.common import prefill_work
    from unisparse_vllm.backend.stats import STATS

    layer = _sparse_layer(monkeypatch, tau=0.5, min_sparse_tokens=400, dense_above_density=None)
    kv_cache = torch.randn(96, 2, 16, 32)  # 3 requests x 32 pages of 16 tokens, head_dim 16
    # a decode of a long request, a long prefill (300 new tokens), a short prefill (50)
    query_start = torch.tensor([0, 1, 301, 351])
    seq_lens = torch.tensor([500, 450, 50])
    work = prefill_work(query_start, seq_lens, torch.arange(96).view(3, 32), 0, 400)
    query = torch.randn(351, 4 * 16)
    name = "model.layers.1.attn.decode_and_prefills"
    layer.forward(name, query, kv_cache, work, torch.empty_like(query), run_dense=lambda: None)
    counters = STATS.layers[name]
    assert (counters.sparse_prefill_tokens, counters.dense_prefill_tokens) == (300, 50)


def test_a_failing_sparse_path_runs_the_step_densely(monkeypatch, caplog) -> None:
    """on_error fallback: the step runs densely, the error is counted every time and logged
    once per kind with its traceback; on_error raise: it propagates."""
    from unisparse_vllm import kernels
    from unisparse_vllm.backend.common import prefill_work
    from unisparse_vllm.backend.stats import STATS

    def broken_plan(*args, **kwargs):
        raise RuntimeError("estimator kernel failed to compile (test)")

    monkeypatch.setattr(kernels, "plan_prefill", broken_plan)
    kv_cache = torch.randn(20, 2, 16, 32)
    query = torch.randn(300, 4 * 16)
    work = prefill_work(
        torch.tensor([0, 300]), torch.tensor([300]), torch.arange(20).view(1, 20), 0, 0
    )
    layer = _sparse_layer(monkeypatch)
    name = "model.layers.1.attn.failing"
    calls = []
    logger = logging.getLogger("vllm.unisparse")  # vLLM's logger may not propagate to root
    logger.addHandler(caplog.handler)
    try:
        for _ in range(2):
            layer.forward(name, query, kv_cache, work, query.clone(), lambda: calls.append(1))
    finally:
        logger.removeHandler(caplog.handler)
    assert len(calls) == 2
    counters = STATS.layers[name]
    assert (counters.sparse_errors, counters.dense_prefill_tokens) == (2, 600)
    # one record, whether it reached the handler directly, through root, or both
    logged = list({id(r): r for r in caplog.records if "sparse path of" in r.getMessage()}.values())
    assert len(logged) == 1 and name in logged[0].getMessage() and logged[0].exc_info

    strict = _sparse_layer(monkeypatch, on_error="raise")
    with pytest.raises(RuntimeError, match="failed to compile"):
        strict.forward(name, query, kv_cache, work, query.clone(), lambda: calls.append(1))


def test_counters_are_exported_to_prometheus() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from unisparse_vllm.backend.stats import SparseStats

    stats, layer = SparseStats(), "model.layers.7.self_attn.attn.prometheus-test"
    stats.record(layer, sparse_tokens=300, dense_tokens=20, selected=6, causal=10)
    stats.record(
        layer,
        sparse_tokens=100,
        dense_tokens=0,
        selected=torch.tensor(2),
        causal=4,
        prompt_length_unknown_tokens=100,
    )
    stats.record(layer, sparse_tokens=0, dense_tokens=0, selected=torch.tensor(3), causal=5)
    assert stats.layers[layer].selected_blocks == 11  # the device counts, read with the rest
    assert stats.layers[layer].mean_density == 11 / 19
    exposed = prometheus_client.generate_latest().decode()

    def value(metric: str, labels: str) -> float:
        prefix = f"{metric}{{{labels}}} "
        (line,) = [x for x in exposed.splitlines() if x.startswith(prefix)]
        return float(line[len(prefix) :])

    tokens = f'layer="{layer}",path='
    assert value("unisparse:prefill_tokens_total", tokens + '"sparse"') == 400
    assert value("unisparse:prefill_tokens_total", tokens + '"dense"') == 20
    assert value("unisparse:selected_blocks_total", f'layer="{layer}"') == 11
    assert value("unisparse:causal_blocks_total", f'layer="{layer}"') == 19
    assert value("unisparse:prompt_length_unknown_tokens_total", f'layer="{layer}"') == 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts stay on a GPU only")
def test_gpu_counts_reach_the_counters_without_a_host_wait() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from unisparse_vllm.backend.stats import SparseStats

    stats, layer = SparseStats(), "model.layers.2.self_attn.attn.readback-test"

    def exported() -> float:
        prefix = f'unisparse:selected_blocks_total{{layer="{layer}"}} '
        lines = prometheus_client.generate_latest().decode().splitlines()
        return sum(float(x[len(prefix) :]) for x in lines if x.startswith(prefix))

    def step(count: int) -> None:
        selected = torch.tensor(count, device="cuda")
        torch.cuda.set_sync_debug_mode("error")  # any host wait in record raises
        try:
            stats.record(layer, sparse_tokens=1, dense_tokens=0, selected=selected, causal=9)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    step(5)  # starts copying 5
    torch.cuda.synchronize()
    step(2)  # the 5 has landed: counted; the 2 is copied next
    assert exported() == 5
    step(1)
    assert stats.layers[layer].selected_blocks == 8 and exported() == 8  # read, waiting


def test_the_sparse_step_does_not_read_the_plan_on_the_host(monkeypatch) -> None:
    """Without a density check nothing in the step reads the selected count (on a GPU, a
    host wait per layer): the counters get it as a tensor; with one, the check reads it."""
    from types import SimpleNamespace

    from unisparse_vllm.backend import common
    from unisparse_vllm.backend.common import prefill_work
    from unisparse_vllm.core import BlockPlan

    class Watched(torch.Tensor):
        reads = 0

        def __int__(self) -> int:
            Watched.reads += 1
            return int(self.item())

    monkeypatch.setattr(BlockPlan, "block_totals", lambda self: pytest.fail("read on the host"))
    monkeypatch.setattr(
        BlockPlan, "selected_blocks", lambda self: self.counts.sum().as_subclass(Watched)
    )
    kv_cache = torch.randn(20, 2, 16, 32)
    work = prefill_work(
        torch.tensor([0, 300]), torch.tensor([300]), torch.arange(20).view(1, 20), 0, 0
    )
    recorded: list[dict] = []
    monkeypatch.setattr(
        common, "STATS", SimpleNamespace(record=lambda _, **kw: recorded.append(kw))
    )
    for threshold, reads in ((None, 0), (0.99, 1)):
        Watched.reads = 0
        layer = _sparse_layer(monkeypatch, tau=0.5, dense_above_density=threshold)
        name = f"model.layers.3.attn.no-read-{threshold}"
        layer.forward(name, torch.randn(300, 64), kv_cache, work, torch.empty(300, 64), lambda: 0)
        assert Watched.reads == reads
        counts = recorded.pop()
        assert isinstance(counts["selected"], Watched)  # handed on unread
        assert 0 < counts["selected"].item() < counts["causal"]


def test_kernels_are_warmed_up_once_per_shape_and_a_failure_only_logs(monkeypatch, caplog) -> None:
    from types import SimpleNamespace

    from unisparse_vllm.backend import common
    from unisparse_vllm.config import resolve_config
    from unisparse_vllm.kernels import warmup

    config = resolve_config({"dense_layers": [0]})
    monkeypatch.setattr(common, "engine_config", lambda: config)
    monkeypatch.setattr(common, "_WARMED_UP", set())
    calls = []
    monkeypatch.setattr(warmup, "warm_up", lambda *a, **kw: calls.append((a, kw)) or 1)
    spec = SimpleNamespace(dtype=torch.bfloat16, num_kv_heads=2, head_size=64, block_size=16)
    model = SimpleNamespace(get_num_attention_heads=lambda parallel: 8, max_model_len=32768)
    vllm_config = SimpleNamespace(model_config=model, parallel_config=None)
    layers = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]

    for _ in range(2):  # a second builder of the same shapes compiles nothing new
        common.warm_up_sparse_kernels(layers, spec, vllm_config, "cuda")
    assert len(calls) == 1
    (budgets,), shapes = calls[0][0][1:], calls[0][1]
    assert [b.dense for b in budgets] == [True, False]
    assert (shapes["num_heads"], shapes["head_dim"], shapes["max_seq_len"]) == (8, 64, 32768)

    common.warm_up_sparse_kernels(layers, spec, vllm_config, "cpu")  # the reference path
    fp8 = SimpleNamespace(**{**vars(spec), "dtype": torch.float8_e4m3fn})
    common.warm_up_sparse_kernels(layers, fp8, vllm_config, "cuda")  # runs dense
    assert len(calls) == 1

    def fail(*args, **kwargs):
        raise RuntimeError("ptxas: out of resources")

    monkeypatch.setattr(warmup, "warm_up", fail)
    logger = logging.getLogger("vllm.unisparse")  # vLLM's logger may not propagate to root
    logger.addHandler(caplog.handler)
    try:
        common.warm_up_sparse_kernels(layers, spec, vllm_config, "cuda:1")  # does not raise
    finally:
        logger.removeHandler(caplog.handler)
    assert "compiling the sparse prefill kernels at start-up failed" in caplog.text
    assert "out of resources" in caplog.text
