"""RULER-style generators and scorers (benchmarks/ruler.py), and the eval pipeline on the
tiny model at toy sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from ruler import TASKS, Haystack, generate, sentences, string_match_all  # noqa: E402

TEXT = " ".join(f"Sentence number {i} talks about rivers and code." for i in range(400))


def words(text: str) -> int:
    return len(text.split())


def test_string_match_all_is_rulers_metric() -> None:
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 100.0
    assert string_match_all("only 123", ["123", "456"]) == 50.0
    assert string_match_all("ABC", ["abc"]) == 100.0


def test_sentence_splitter() -> None:
    assert sentences("One. Two!  Three? four") == ["One.", "Two!", "Three?", "four"]


@pytest.mark.parametrize("task", TASKS)
def test_generators_fit_the_budget_and_hide_their_answers(task: str) -> None:
    hay = Haystack(TEXT, words)
    sample = generate(task, hay, 600, seed=3)
    assert sample.task == task and sample.references
    assert words(sample.prompt) <= 700
    for ref in sample.references:
        assert ref in sample.prompt, f"{task}: reference {ref} is not in the prompt"
    assert generate(task, hay, 600, seed=3) == sample, "a seed gives one sample"
    assert generate(task, hay, 600, seed=4).prompt != sample.prompt


def test_niah_multiquery_asks_for_every_key() -> None:
    sample = generate("niah_multiquery", Haystack(TEXT, words), 800, seed=1)
    assert len(sample.references) == 4 and all(k in sample.prompt for k in sample.meta["keys"])


@pytest.mark.vllm
@pytest.mark.slow
def test_eval_pipeline_on_the_tiny_model(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from tiny_model import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny")
    haystack = tmp_path / "essay.txt"
    haystack.write_text(TEXT)
    configs = [
        {"name": "dense"},
        {
            "name": "unisparse",
            "backend": "unisparse",
            "unisparse": {
                "min_sparse_tokens": 0,
                "block_size": 64,
                "c_q": 8,
                "c_k": 8,
                "dense_above_density": None,
            },
        },
    ]
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH / "eval_ruler.py"),
            "--model",
            str(model),
            "--haystack",
            str(haystack),
            "--lengths",
            "512",
            "--samples",
            "1",
            "--tasks",
            "niah_single",
            "vt",
            "--configs",
            json.dumps(configs),
            "--engine-args",
            json.dumps({"enforce_eager": True, "dtype": "float32"}),
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(report["table"]) == {"dense", "unisparse"}
    for per_length in report["table"].values():
        assert 0.0 <= per_length["512"]["average"] <= 100.0
    sparse_stats = [r["stats"] for r in report["records"]["unisparse"] if "stats" in r]
    assert sparse_stats and any(v["sparse_prefill_tokens"] for v in sparse_stats[0].values())
    assert "average" in result.stdout
