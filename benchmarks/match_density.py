"""Configs at a matched density, from a tau sweep: the peers' own top-p rule against ours.

    python benchmarks/match_density.py sweep/results.json --target 16384=0.276 \\
        --target 32768=0.224 --out-dir matched

Reads an ``eval_ruler.py`` run whose UNISPARSE configs differ only in ``tau`` within each
group (same estimator and other settings), and for every group and target ``LENGTH=DENSITY``
interpolates the ``tau`` whose measured mean density is the target. Writes one ``eval_ruler``
spec per length, ``matched_<LENGTH>.yaml``: that length, dense (the reference of the "% of
dense" column; ``--only`` skips it where an earlier run's dense pairs by ``--combine``) and
the matched configs; the other options (samples, engine args, ...) come from the command
line of the run that uses it. Only densities are read, but run the sweep with >= 10 samples
per task and the main run's engine arguments: the prefill tokens that run dense (a prompt's
first chunk below ``min_sparse_tokens``) count in the density, and their share depends on
how the scheduler packs steps (benchmarks/RESULTS.md section 4, seventh run).

Why not top-k at the same fraction: top-k matches the density exactly but imposes one
allocation rule on every estimator, so it compares block scores only. A peer's method is
its scores *and* its threshold rule (XAttention's and FlexPrefill's cumulative thresholds),
and that is what our calibrated top-p profile is compared with at its own density.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import yaml


def sweep_groups(run: dict, length: int) -> dict[str, list[tuple[float, float]]]:
    """``{group: [(tau, density), ...]}`` sorted by tau, one group per set of UNISPARSE
    settings other than ``tau`` (top-p configs only: a top-k config has no tau to match; a
    config that failed has no density)."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for config in run["args"]["configs"]:
        settings = dict(config.get("unisparse", {}))
        if config.get("backend") != "unisparse" or settings.get("mode", "top_p") != "top_p":
            continue
        if config["name"] not in run["table"]:
            continue
        tau = settings.pop("tau", None)
        if tau is None:
            continue
        density = run["table"][config["name"]][str(length)]["density"]
        groups.setdefault(json.dumps(settings, sort_keys=True), []).append((tau, density))
    return {key: sorted(points) for key, points in groups.items()}


def matched_tau(points: list[tuple[float, float]], target: float) -> float:
    """The tau where the piecewise-linear density curve through ``points`` first reaches
    ``target``; a target outside the measured densities is an error (sweep wider)."""
    for (tau_lo, d_lo), (tau_hi, d_hi) in itertools.pairwise(points):
        if min(d_lo, d_hi) <= target <= max(d_lo, d_hi):
            if d_hi == d_lo:
                return tau_lo
            return tau_lo + (target - d_lo) * (tau_hi - tau_lo) / (d_hi - d_lo)
    measured = ", ".join(f"tau {t:g}: {d:.3f}" for t, d in points)
    raise ValueError(f"density {target} is not within the sweep ({measured}): sweep wider")


def matched_configs(run: dict, length: int, target: float) -> list[dict]:
    configs = []
    for key, points in sweep_groups(run, length).items():
        settings = json.loads(key)
        if len(points) < 2:
            raise ValueError(f"settings {settings}: {len(points)} tau measured, need >= 2")
        try:
            tau = round(matched_tau(points, target), 3)
        except ValueError as err:
            raise ValueError(f"settings {settings} at {length} tokens: {err}") from None
        estimator = settings.get("estimator", "unisparse")
        configs.append(
            {
                "name": f"{estimator} top-p tau {tau} (swept for density {target} at {length})",
                "backend": "unisparse",
                "unisparse": {**settings, "tau": tau},
            }
        )
    if not configs:
        raise ValueError("the run holds no UNISPARSE top-p config with a tau")
    return configs


# Above this share of prefill tokens run dense (first chunks below min_sparse_tokens), a
# sweep's densities say as much about its schedule as about tau: measured 0.159 in a sweep
# whose densities came out 0.03 high, 0.02-0.06 in the 100-sample runs.
DENSE_SHARE_WARNING = 0.1


def dense_share(run: dict, length: int) -> float:
    """The largest share of prefill tokens that ran dense, over the run's sparse configs."""
    shares = [per[str(length)].get("fallback", 0.0) for per in run["table"].values()]
    return max(shares, default=0.0)


def parse_target(text: str) -> tuple[int, float]:
    length, sep, density = text.partition("=")
    try:
        parsed = int(length), float(density)
    except ValueError:
        parsed = None
    if not sep or parsed is None or not 0 < parsed[1] <= 1:
        raise argparse.ArgumentTypeError(f"--target {text!r}: expected LENGTH=DENSITY, 0 < D <= 1")
    return parsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", type=Path, help="results.json of the tau sweep")
    parser.add_argument("--target", type=parse_target, action="append", required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    run = json.loads(args.sweep.read_text())
    if "configs" not in run.get("args", {}):
        parser.error(f"{args.sweep}: no configs recorded (made by an older eval_ruler.py)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for length, density in args.target:
        if str(length) not in next(iter(run["table"].values())):
            parser.error(f"--target {length}={density}: the sweep did not run {length} tokens")
        try:
            configs = matched_configs(run, length, density)
        except ValueError as err:
            parser.error(str(err))
        share = dense_share(run, length)
        if share > DENSE_SHARE_WARNING:
            print(
                f"warning: at {length} tokens {share:.0%} of the sweep's prefill tokens ran "
                "dense (first chunks below min_sparse_tokens): its densities depend on the "
                "schedule; sweep under the main run's engine arguments",
                file=sys.stderr,
            )
        path = args.out_dir / f"matched_{length}.yaml"
        header = f"# Matched to density {density} at {length} tokens from {args.sweep}\n"
        spec = {"lengths": [length], "configs": [{"name": "dense (FA3)"}, *configs]}
        path.write_text(header + yaml.safe_dump(spec, sort_keys=False))
        for config in configs:
            print(f"{path}: {config['name']}")


if __name__ == "__main__":
    main()
