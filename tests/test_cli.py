"""The ``unisparse`` command line, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import yaml

from unisparse_vllm.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unisparse_vllm.cli", *args], capture_output=True, text=True
    )


def test_config_show_resolves_family_and_file(tmp_path) -> None:
    user = tmp_path / "p.yaml"
    user.write_text("tau: 0.8\n")
    result = run("config", "show", "--model-type", "llama", "--file", str(user))
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["tau"] == 0.8 and shown["dense_layers"] == [0] and shown["block_size"] == 128


def test_config_validate(tmp_path, capsys) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("mode: topk\ndensity: 0.2\n")
    assert main(["config", "validate", str(good)]) == 0
    assert "valid" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("c_k: 48\n")
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "c_k = 48" in err and "bad.yaml" in err
    assert main(["config", "validate", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_prints_its_table() -> None:
    result = run("demo", "--seq-len", "1024", "--block-size", "64")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[1].split() == [
        "tau",
        "density",
        "recall",
        "recall_min",
        "rel_err",
        "rank_corr",
        "FLOP_speedup",
    ]
    rows = {float(line.split()[0]): line.split() for line in lines[2:]}
    assert set(rows) == {0.8, 0.9, 0.95, 1.0}
    dense = rows[1.0]
    assert float(dense[1]) == 1.0 and float(dense[4]) < 1e-3  # tau = 1 is dense
    assert float(rows[0.8][1]) < float(rows[0.95][1]) < 1.0  # density grows with tau
    assert float(rows[0.8][6].rstrip("x")) > 1.0


def test_shipped_example_profile_is_valid() -> None:
    from pathlib import Path

    example = Path(__file__).parents[1] / "deploy" / "profile-example.yaml"
    assert main(["config", "validate", str(example)]) == 0


def test_serve_script_refuses_a_bad_profile_before_starting_vllm(tmp_path) -> None:
    import os
    from pathlib import Path

    bad = tmp_path / "bad.yaml"
    bad.write_text("tau: 1.7\n")
    # a `vllm` on PATH that records being started: it must not be
    marker = tmp_path / "vllm-started"
    fake_vllm = tmp_path / "bin" / "vllm"
    fake_vllm.parent.mkdir()
    fake_vllm.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake_vllm.chmod(0o755)
    path = f"{fake_vllm.parent}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    script = Path(__file__).parents[1] / "deploy" / "serve.sh"
    result = subprocess.run(
        ["bash", str(script), "some/model", str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path},
    )
    assert result.returncode != 0 and "tau = 1.7" in result.stdout + result.stderr
    assert not marker.exists()
    ok = subprocess.run(
        ["bash", str(script), "some/model"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path},
    )
    assert ok.returncode == 0 and marker.exists(), ok.stderr  # the example profile passes
