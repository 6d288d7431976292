"""``benchmarks/e2e_vllm.py``'s CPU-side parts: TTFT prompts (synthetic ids or cut from real
text) and the options it refuses before starting any engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import BENCH, run_benchmark

sys.path.insert(0, str(BENCH))

from e2e_vllm import prompt_ids


def test_synthetic_prompts_have_the_length_and_differ_per_repetition() -> None:
    first, second = prompt_ids(5000, 0), prompt_ids(5000, 1)
    assert len(first) == len(second) == 5000
    assert first != second and first == prompt_ids(5000, 0)


def test_text_prompts_cycle_the_text_from_a_per_repetition_offset() -> None:
    text = list(range(2500))
    assert prompt_ids(4, 0, text) == [0, 1, 2, 3]
    assert prompt_ids(3, 1, text) == [1000, 1001, 1002]
    cycled = prompt_ids(6000, 2, text)  # longer than the text: it wraps around
    assert len(cycled) == 6000 and cycled[:2] == [2000, 2001] and cycled[500] == 0


def _run(*argv: str) -> subprocess.CompletedProcess:
    return run_benchmark("e2e_vllm.py", list(argv), timeout=120)


def test_real_weights_need_a_model_folder_and_an_existing_text(tmp_path: Path) -> None:
    result = _run("--skip", "tokens", "serve", "--ttft-text", "essays.txt")
    assert result.returncode == 2 and "--ttft-text needs --ttft-model" in result.stderr
    missing = tmp_path / "none.txt"
    result = _run("--ttft-model", str(tmp_path), "--ttft-text", str(missing))
    assert result.returncode == 2 and f"--ttft-text {missing}: no such file" in result.stderr


def test_a_bad_ttft_budget_is_refused_before_any_engine_starts() -> None:
    result = _run("--skip", "tokens", "serve", "--ttft-unisparse", '{"tau": 1.5}')
    assert result.returncode == 2 and "--ttft-unisparse" in result.stderr
    assert "tau = 1.5" in result.stderr, result.stderr
    result = _run("--skip", "tokens", "serve", "--ttft-unisparse", "[0.5]")
    assert result.returncode == 2 and "must be a JSON object" in result.stderr
