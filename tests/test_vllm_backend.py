"""UNISPARSE inside vLLM (CPU build): offline generation, the OpenAI server, bad configs.

Each engine runs in its own process (``vllm_offline.py`` or the API server), as users run
them; the tiny random Llama comes from ``tiny_model.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).parent
SPARSE_ON = {
    "min_sparse_tokens": 0,
    "block_size": 64,
    "c_q": 8,
    "c_k": 8,
    "tau": 0.3,
    "dense_layers": [],
    "dense_tail_blocks": 0,
    "dense_above_density": None,  # the random tiny model selects densely: keep the sparse path
    "on_error": "raise",  # a failing sparse path must fail the test, not fall back quietly
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **extra}


def offline(
    model: Path, backend: str, unisparse: dict | None = None, *flags: str, **env: str
) -> dict:
    config = json.dumps({"unisparse": unisparse} if unisparse is not None else {})
    result = subprocess.run(
        [sys.executable, str(HERE / "vllm_offline.py"), str(model), backend, config, *flags],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def dense_reference(tiny_model: Path) -> dict:
    return offline(tiny_model, "CPU_ATTN")


def test_sparsity_off_matches_default_cpu_backend(tiny_model: Path, dense_reference: dict) -> None:
    # Default config: every prompt here is below min_sparse_tokens, so all of it is dense.
    below_threshold = offline(tiny_model, "unisparse")
    assert below_threshold["tokens"] == dense_reference["tokens"]
    assert below_threshold["stats"] == {}
    # tau = 1 through the whole sparse machinery (estimate, select, plan, attend).
    tau_one = offline(tiny_model, "UniSparse", {**SPARSE_ON, "tau": 1.0})
    assert tau_one["tokens"] == dense_reference["tokens"]
    assert all(layer["mean_density"] == 1.0 for layer in tau_one["stats"].values())
    assert all(layer["sparse_prefill_tokens"] > 0 for layer in tau_one["stats"].values())


def test_sparse_path_runs_and_stays_close(tiny_model: Path, dense_reference: dict) -> None:
    sparse = offline(tiny_model, "unisparse", SPARSE_ON)
    stats = sparse["stats"]
    assert set(stats) == {"model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"}
    for layer in stats.values():
        assert layer["sparse_prefill_tokens"] > 0
        assert layer["mean_density"] < 0.9
    # Closeness metric: the log-probability of dense attention's first greedy token, under
    # sparse attention, within 0.5 nats for every prompt.
    for dense_lp, sparse_lp in zip(
        dense_reference["first_logprobs"], sparse["first_logprobs"], strict=True
    ):
        token, logprob = max(dense_lp.items(), key=lambda kv: kv[1])
        assert token in sparse_lp
        assert abs(sparse_lp[token] - logprob) < 0.5


def test_every_chunk_of_a_long_prompt_runs_sparse(tiny_model: Path) -> None:
    """The long prompt alone, prefilled in 64-token steps, min_sparse_tokens 256: its first
    chunks end below 256 tokens, yet they run sparse, because the backend reads the prompt's
    length from the model runner (vLLM's attention metadata has only the tokens so far)."""
    sparse = offline(
        tiny_model, "unisparse", {**SPARSE_ON, "min_sparse_tokens": 256}, "--prompts", "3"
    )
    (prompt_tokens,) = sparse["prompt_tokens"]
    assert prompt_tokens > 4 * 64
    for layer in sparse["stats"].values():
        assert layer["sparse_prefill_tokens"] == prompt_tokens


def test_a_length_tier_serves_each_prompt_by_its_length(tiny_model: Path) -> None:
    """Layer 1 dense under 256 prompt tokens and sparse from there, in one batch of a short
    and a long prompt, prefilled in 64-token steps: layer 1 runs the long prompt's every
    token sparse (its first chunks too) and none of the short one's; layer 0 runs both."""
    tier = {"min_prompt_tokens": 256, "layer_overrides": [{"layers": [1], "dense": False}]}
    config = {**SPARSE_ON, "dense_layers": [1], "length_tiers": [tier]}
    sparse = offline(tiny_model, "unisparse", config, "--prompts", "0", "3", "--no-prefix-caching")
    short, long = sparse["prompt_tokens"]
    assert short < 256 <= long
    layers = sparse["stats"]
    assert layers["model.layers.0.self_attn.attn"]["sparse_prefill_tokens"] == short + long
    assert layers["model.layers.1.self_attn.attn"]["sparse_prefill_tokens"] == long


def test_the_runner_rows_compat_reads_exist_in_this_vllm() -> None:
    """What ``compat`` wraps and reads in each of vLLM's model runners (the V2 runner runs on
    CUDA in 0.26; the CPU build runs the first), checked against the installed vLLM."""
    import dataclasses
    import importlib
    import inspect

    from vllm.v1.worker import gpu_input_batch
    from vllm.v1.worker.gpu import input_batch as input_batch_v2

    from unisparse_vllm.backend import compat

    wrapped = [
        getattr(getattr(importlib.import_module(module), runner), method)
        for module, runner, method, _ in compat._RUNNERS
    ]
    assert list(inspect.signature(wrapped[1]).parameters)[1] == "input_batch"  # the V2 runner's
    fields = {f.name for f in dataclasses.fields(input_batch_v2.InputBatch)}
    assert {"prefill_len_np", "num_computed_tokens_np"} <= fields
    made = inspect.getsource(gpu_input_batch.InputBatch.__init__)
    assert "self.num_prompt_tokens =" in made and "self.num_computed_tokens_cpu =" in made


def test_multiprocess_engine_survives_the_enum_pickling(
    tiny_model: Path, dense_reference: dict
) -> None:
    result = offline(tiny_model, "unisparse", None, "--multiprocess")
    assert result["tokens"] == dense_reference["tokens"]


def test_tensor_parallel_2_runs_sparse_on_both_ranks(tiny_model: Path, tmp_path: Path) -> None:
    # vLLM's CPU workers bind threads per rank: one core each on a 2-core machine.
    bind = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    dense = offline(tiny_model, "CPU_ATTN", None, "--multiprocess", "--tp", "2", **bind)
    tau_one = {**SPARSE_ON, "tau": 1.0}
    stats = str(tmp_path / "stats")
    sparse = offline(
        tiny_model,
        "unisparse",
        tau_one,
        "--multiprocess",
        "--tp",
        "2",
        UNISPARSE_STATS_PATH=stats,
        **bind,
    )
    assert sparse["tokens"] == dense["tokens"]
    ranks = [json.loads(p.read_text()) for p in tmp_path.glob("stats.*.json")]
    assert len(ranks) == 2, "one counter file per tensor-parallel rank"
    for counters in ranks:
        assert sum(layer["sparse_prefill_tokens"] for layer in counters.values()) > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: Path, port: int, additional_config: dict, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--attention-backend",
            "unisparse",
            "--additional-config",
            json.dumps(additional_config),
            "--dtype",
            "float32",
            "--max-model-len",
            "4096",
            "--enforce-eager",
            "--max-num-batched-tokens",
            "64",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(**env),
    )


def _wait_ready(server: subprocess.Popen, port: int, timeout: float = 240) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(
                f"server exited {server.returncode}: {server.stdout.read()[-4000:]}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError("server did not become ready")


def test_openai_server(tiny_model: Path, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    port = _free_port()
    stats_path = tmp_path / "stats"
    metrics_dir = tmp_path / "prometheus"  # how /metrics sees the engine process's counters
    metrics_dir.mkdir()
    server = _serve(
        tiny_model,
        port,
        {"unisparse": SPARSE_ON},
        UNISPARSE_STATS_PATH=str(stats_path),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    try:
        _wait_ready(server, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        completion = client.completions.create(
            model="tiny", prompt="the quick brown fox " * 30, max_tokens=5, temperature=0
        )
        assert completion.usage.completion_tokens == 5
        messages = [{"role": "user", "content": "seven wizards judge boxing " * 20}]
        chat = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0
        )
        assert chat.choices[0].message.content is not None
        streamed = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True
        )
        pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
        assert "".join(pieces) == chat.choices[0].message.content

        def ask(repeat: int) -> int:
            reply = client.completions.create(
                model="tiny", prompt="lazy dog rivers " * repeat, max_tokens=4, temperature=0
            )
            return reply.usage.prompt_tokens

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            lengths = list(pool.map(ask, [5, 60, 150, 300]))
        assert len(set(lengths)) == 4

        written = list(tmp_path.glob("stats.*.json"))
        assert written, "the engine process wrote no UniSparse counters"
        counters = json.loads(written[0].read_text())
        sparse_tokens = sum(layer["sparse_prefill_tokens"] for layer in counters.values())
        assert sparse_tokens > 0

        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            exposed = reply.read().decode()
        scraped = [
            float(line.rsplit(" ", 1)[1])
            for line in exposed.splitlines()
            if line.startswith("unisparse:prefill_tokens_total{") and 'path="sparse"' in line
        ]
        assert len(scraped) == len(counters), "one sparse-token series per layer"
        assert sum(scraped) >= sparse_tokens, "the scrape came after the file was written"
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_bad_config_stops_the_server(tiny_model: Path) -> None:
    server = _serve(tiny_model, _free_port(), {"unisparse": {"tau": 1.7}})
    try:
        output, _ = server.communicate(timeout=300)
    finally:
        server.kill()
    assert server.returncode != 0
    assert "tau = 1.7" in output and "less than or equal to 1" in output
