"""``benchmarks/fidelity.py`` on the tiny random Llama: the grid, per-layer rows, the summary
and the plot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import run_benchmark


def test_fidelity_grid_on_the_tiny_model(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tiny_model import TEXT, build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny", head_dim=32)
    essays = tmp_path / "essays"
    essays.mkdir()
    (essays / "a.txt").write_text(" ".join([TEXT] * 60))
    out, png = tmp_path / "fid.json", tmp_path / "fid.png"
    argv = ["--model", str(model), "--essays", str(essays), "--tokens", "512"]
    argv += ["--block-sizes", "64", "--composite", "8", "4:8", "--c-h", "1", "2"]
    argv += ["--taus", "0.9", "--out", str(out)]
    plotting = importlib.util.find_spec("matplotlib") is not None  # the [eval] extra
    argv += ["--plot", str(png)] if plotting else []
    result = run_benchmark("fidelity.py", argv, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    grid = {(r["c_q"], r["c_k"], r["c_h"]) for r in report["summary"]}
    assert grid == {(8, 8, 1), (8, 8, 2), (4, 8, 1), (4, 8, 2)}
    assert {r["layer"] for r in report["rows"]} == {0, 1}  # every layer of the tiny model
    assert len(report["rows"]) == 2 * len(grid)
    for row in report["summary"]:
        assert 0.0 < row["density"] <= 1.0 and 0.0 < row["mass_recall_mean"] <= 1.0 + 1e-6
    assert png.is_file() == plotting
    assert "rank_corr" in result.stdout
