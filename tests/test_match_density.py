"""``benchmarks/match_density.py``: taus interpolated from a sweep's measured densities, one
group per estimator, and specs that ``eval_ruler.py`` runs as they are written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import BENCH

sys.path.insert(0, str(BENCH))

import match_density

# density per (estimator, tau) at 16384 tokens; 32768 is sparser
SWEEP = {
    ("xattention", 0.9): 0.22,
    ("xattention", 0.95): 0.30,
    ("last_block", 0.9): 0.20,
    ("last_block", 0.95): 0.24,
    ("last_block", 0.99): 0.32,
}


def _run() -> dict:
    configs = [
        {"name": "dense"},
        {"name": "topk", "backend": "unisparse", "unisparse": {"mode": "topk", "density": 0.2}},
    ]
    table = {
        "dense": {"16384": {"density": 1.0}, "32768": {"density": 1.0}},
        "topk": {"16384": {"density": 0.26}, "32768": {"density": 0.25}},
    }
    for (estimator, tau), density in SWEEP.items():
        name = f"{estimator} {tau}"
        configs.append(
            {
                "name": name,
                "backend": "unisparse",
                "unisparse": {"estimator": estimator, "tau": tau},
            }
        )
        table[name] = {"16384": {"density": density}, "32768": {"density": density - 0.05}}
    # a config that failed: recorded, but no table entry
    configs.append(
        {
            "name": "failed",
            "backend": "unisparse",
            "unisparse": {"estimator": "xattention", "tau": 0.99},
        }
    )
    return {"args": {"configs": configs}, "table": table}


def test_taus_are_interpolated_per_estimator_and_length() -> None:
    run = _run()
    by_estimator = {
        c["unisparse"]["estimator"]: c["unisparse"]["tau"]
        for c in match_density.matched_configs(run, 16384, 0.26)
    }
    assert by_estimator == {"xattention": 0.925, "last_block": 0.96}
    # 0.05 sparser at 32K: the same taus reach 0.05 less density there
    longer = {
        c["unisparse"]["estimator"]: c["unisparse"]["tau"]
        for c in match_density.matched_configs(run, 32768, 0.21)
    }
    assert longer == by_estimator


def test_a_target_outside_the_sweep_is_refused_naming_the_measured_range() -> None:
    with pytest.raises(ValueError, match=r"xattention.*tau 0.95: 0.300.*sweep wider"):
        match_density.matched_configs(_run(), 16384, 0.31)


def test_written_specs_run_through_eval_ruler(tmp_path: Path) -> None:
    import eval_ruler

    sweep = tmp_path / "results.json"
    sweep.write_text(json.dumps(_run()))
    match_density.main(
        [str(sweep), "--target", "16384=0.26", "--target", "32768=0.2", "--out-dir", str(tmp_path)]
    )
    spec = tmp_path / "matched_32768.yaml"
    args, configs, _ = eval_ruler.parse_args(
        ["--spec", str(spec), "--model", "m", "--haystack", "h", "--tasks", "vt"]
    )
    assert args.lengths == [32768]
    assert configs[0] == {"name": "dense (FA3)"}  # the reference comes first
    assert {c["unisparse"]["tau"] for c in configs[1:]} == {0.919, 0.955}
    assert all("density 0.2 at 32768" in c["name"] for c in configs[1:])


def test_a_sweep_with_many_dense_tokens_is_flagged(tmp_path: Path, capsys) -> None:
    run = _run()
    run["table"]["xattention 0.9"]["16384"]["fallback"] = 0.159  # as the 2-sample sweep had
    run["table"]["xattention 0.9"]["32768"]["fallback"] = 0.025
    sweep = tmp_path / "results.json"
    sweep.write_text(json.dumps(run))
    argv = [str(sweep), "--target", "16384=0.26", "--target", "32768=0.2"]
    match_density.main([*argv, "--out-dir", str(tmp_path)])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "at 16384 tokens 16% of the sweep's prefill" in warnings[0]


@pytest.mark.parametrize("target", ["16384", "16384=0", "x=0.2", "16384=1.5"])
def test_bad_targets_exit_naming_the_value(target: str, capsys) -> None:
    with pytest.raises(SystemExit):
        match_density.main(["r.json", "--target", target, "--out-dir", "o"])
    assert f"--target {target!r}" in capsys.readouterr().err


def test_a_run_without_recorded_configs_is_refused(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "old.json"
    sweep.write_text(json.dumps({"args": {}, "table": {}}))
    with pytest.raises(SystemExit):
        match_density.main([str(sweep), "--target", "16384=0.2", "--out-dir", str(tmp_path)])
    assert "no configs recorded" in capsys.readouterr().err
