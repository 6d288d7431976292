"""RULER-style accuracy through vLLM offline generation: dense vs UNISPARSE budgets.

    python benchmarks/eval_ruler.py --model /models/qwen05 --haystack PaulGrahamEssays/ \\
        --lengths 4096 8192 --samples 25 --out-dir ruler-out \\
        --configs '[{"name": "dense"}, {"name": "unisparse", "backend": "unisparse",
                     "unisparse": {"tau": 0.9}}]'

Each config runs in its own process (one engine each); prints a table (per task and
average, per length), writes ``results.json`` and ``accuracy.png`` under ``--out-dir``.
A config without ``backend`` uses vLLM's default backend for the platform.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ruler import TASKS, Haystack, generate, string_match_all

MAX_TOKENS = {"cwe": 120, "fwe": 50, "vt": 30}
DEFAULT_MAX_TOKENS = 40


def haystack_text(path: Path) -> str:
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    return "\n\n".join(f.read_text(errors="ignore") for f in files)


def worker(spec: dict) -> list[dict]:
    """Generate every sample of ``spec`` with one engine; returns one record per sample."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    hay = Haystack(haystack_text(Path(spec["haystack"])), lambda s: len(tokenizer.encode(s)))
    samples = [
        (length, generate(task, hay, length - DEFAULT_MAX_TOKENS - 64, spec["seed"] + i))
        for length in spec["lengths"]
        for task in spec["tasks"]
        for i in range(spec["samples"])
    ]
    kwargs: dict = {"model": spec["model"], "max_model_len": max(spec["lengths"]) + 256, "seed": 0}
    if spec.get("backend"):
        kwargs["attention_backend"] = spec["backend"]
        kwargs["additional_config"] = {"unisparse": spec.get("unisparse", {})}
    kwargs.update(spec.get("engine_args", {}))
    llm = LLM(**kwargs)
    params = [
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS.get(s.task, DEFAULT_MAX_TOKENS))
        for _, s in samples
    ]
    outputs = llm.generate([s.prompt for _, s in samples], params)
    records = []
    for (length, sample), out in zip(samples, outputs, strict=True):
        text = out.outputs[0].text
        records.append(
            {
                "task": sample.task,
                "length": length,
                "prompt_tokens": len(out.prompt_token_ids),
                "score": string_match_all(text, sample.references),
                "prediction": text[:200],
                "references": sample.references,
            }
        )
    if (
        spec.get("backend") == "unisparse"
        and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    ):
        from unisparse_vllm.backend.stats import STATS

        records.append({"stats": STATS.snapshot()})
    return records


def run_config(spec: dict) -> list[dict]:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"config {spec['name']} failed:\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def summarize(results: dict[str, list[dict]], tasks: list[str], lengths: list[int]) -> dict:
    table: dict = {}
    for name, records in results.items():
        scored = [r for r in records if "score" in r]
        per = {}
        for length in lengths:
            by_task = {
                task: statistics.mean(
                    r["score"] for r in scored if r["task"] == task and r["length"] == length
                )
                for task in tasks
            }
            per[length] = {**by_task, "average": statistics.mean(by_task.values())}
        table[name] = per
    return table


def print_table(table: dict, tasks: list[str], lengths: list[int]) -> None:
    head = f"{'config':<24}{'length':>8}" + "".join(f"{t[:14]:>15}" for t in [*tasks, "average"])
    print(head)
    for name, per in table.items():
        for length in lengths:
            row = per[length]
            print(
                f"{name:<24}{length:>8}" + "".join(f"{row[t]:>15.1f}" for t in [*tasks, "average"])
            )


def plot(table: dict, lengths: list[int], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, per in table.items():
        ax.plot(lengths, [per[n]["average"] for n in lengths], "-o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("RULER-style average score")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker")
    parser.add_argument("--model")
    parser.add_argument("--haystack", type=Path, help="essay .txt folder or file")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default='[{"name": "dense"}]', help="JSON list of configs")
    parser.add_argument("--engine-args", default="{}", help="JSON: extra LLM(...) arguments")
    parser.add_argument("--out-dir", type=Path, required=False)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if not args.model or not args.haystack:
        parser.error("--model and --haystack are required")
    base = {
        "model": args.model,
        "haystack": str(args.haystack),
        "tasks": args.tasks,
        "lengths": args.lengths,
        "samples": args.samples,
        "seed": args.seed,
        "engine_args": json.loads(args.engine_args),
    }
    results = {c["name"]: run_config({**base, **c}) for c in json.loads(args.configs)}
    table = summarize(results, args.tasks, args.lengths)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "results.json").write_text(
            json.dumps({"args": base, "table": table, "records": results}, indent=1)
        )
        plot(table, args.lengths, args.out_dir / "accuracy.png")
    print_table(table, args.tasks, args.lengths)


if __name__ == "__main__":
    main()
