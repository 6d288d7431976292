"""``benchmarks/answer_shift.py`` on the tiny random Llama: tau 1 through the sparse path moves
no answer, a sparse budget does, and bad ``--configs`` are refused by name."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import run_benchmark

# Layer 0 sparse too: with the family's dense layer 0 the tiny model's second and last layer
# would be the only sparse one, and no later layer reads its prompt rows.
TOY = {"min_sparse_tokens": 0, "block_size": 64, "local_blocks": 1, "dense_layers": []}


def _run(tmp_path: Path, configs: str) -> subprocess.CompletedProcess:
    from tiny_model import TEXT, build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny")
    haystack = tmp_path / "essay.txt"
    haystack.write_text(TEXT)
    argv = ["--model", str(model), "--haystack", str(haystack), "--tasks", "niah_single", "vt"]
    argv += ["--length", "700", "--samples", "2", "--device", "cpu", "--configs", configs]
    argv += ["--out", str(tmp_path / "shift.json")]
    return run_benchmark("answer_shift.py", argv, timeout=600)


def test_answers_move_only_under_a_sparse_budget(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    configs = [
        {"name": "tau 1", "unisparse": {**TOY, "tau": 1.0}},
        # chunked prefill: each step attends to the cache of the earlier ones, exactly
        {"name": "tau 1, chunks of 256", "unisparse": {**TOY, "tau": 1.0}, "chunk": 256},
        {"name": "topk 0.3", "unisparse": {**TOY, "mode": "topk", "density": 0.3}},
    ]
    result = _run(tmp_path, json.dumps(configs))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "shift.json").read_text())
    assert len(report["rows"]) == 4 and {r["task"] for r in report["rows"]} == {"niah_single", "vt"}
    for row in report["rows"]:
        for exact in (row["tau 1"], row["tau 1, chunks of 256"]):
            # every block: the reference must equal SDPA's dense answer
            assert abs(exact["log_likelihood_change"]) < 1e-4 and abs(exact["kl"]) < 1e-5
            assert exact["top1_kept"] == 1.0 and exact["density"] == 1.0
    sparse = report["summary"]["topk 0.3"]
    assert sparse["kl"]["mean"] > 1e-3 and sparse["top1_kept"]["mean"] < 1.0
    assert 0.3 <= sparse["density"]["mean"] < 1.0  # top-k 0.3 plus sink and local blocks
    assert "top-1 kept" in result.stdout


@pytest.mark.parametrize(
    "configs,message",
    [
        ("[{name: 1}]", "--configs must be JSON"),
        ('{"name": "a"}', "must be a list of objects, each with a name"),
        ('[{"name": "a", "unisparse": {"tau": 1.7}}]', "tau = 1.7"),
        ('[{"name": "a", "chunk": 0}]', "config 'a': chunk = 0: must be a positive integer"),
    ],
)
def test_bad_configs_are_refused_by_name(tmp_path: Path, configs: str, message: str) -> None:
    pytest.importorskip("transformers")
    result = _run(tmp_path, configs)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
