"""RULER-style generators and scorers (benchmarks/ruler.py), and the eval pipeline on the
tiny model at toy sizes."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
from helpers import BENCH, run_benchmark

sys.path.insert(0, str(BENCH))

from ruler import (
    QA_FILES,
    TASKS,
    Haystack,
    QACorpus,
    generate,
    score,
    sentences,
    string_match_all,
)

TEXT = " ".join(f"Sentence number {i} talks about rivers and code." for i in range(400))
ESSAY_TASKS = [t for t in TASKS if t not in QA_FILES]


def words(text: str) -> int:
    return len(text.split())


def write_qa_data(folder: Path) -> Path:
    """Tiny files in the SQuAD 2.0 and HotpotQA (distractor) layouts the real data uses."""
    folder.mkdir(parents=True, exist_ok=True)
    articles = [
        {
            "title": f"Article {a}",
            "paragraphs": [
                {
                    "context": f"Paragraph {a}.{p}: the river {a}{p} flows past town T{a}{p}.",
                    "qas": [
                        {
                            "question": f"Which town does river {a}{p} flow past?",
                            "answers": [{"text": f"T{a}{p}", "answer_start": 0}],
                            "is_impossible": False,
                        },
                        {"question": "Unanswerable?", "answers": [], "is_impossible": True},
                    ],
                }
                for p in range(5)
            ],
        }
        for a in range(30)
    ]
    (folder / "squad.json").write_text(json.dumps({"version": "v2.0", "data": articles}))
    items = [
        {
            "question": f"Who founded company C{i} and when?",
            "answer": f"Founder{i}",
            "context": [
                [f"C{i}", [f"C{i} was founded by Founder{i}.", " It makes boats."]],
                [f"Founder{i}", [f"Founder{i} was born in {1900 + i}."]],
            ],
        }
        for i in range(60)
    ]
    (folder / "hotpotqa.json").write_text(json.dumps(items))
    return folder


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> dict[str, QACorpus]:
    folder = write_qa_data(tmp_path_factory.mktemp("qa"))
    return {task: QACorpus.load(task, folder, words) for task in QA_FILES}


def test_string_match_all_is_rulers_metric() -> None:
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 100.0
    assert string_match_all("only 123", ["123", "456"]) == 50.0
    assert string_match_all("ABC", ["abc"]) == 100.0


def test_qa_scores_any_reference_and_other_tasks_all() -> None:
    assert score("qa_squad", "It is Paris.", ["paris", "the city of Paris"]) == 100.0
    assert score("qa_hotpotqa", "London", ["Paris"]) == 0.0
    assert score("niah_multikey", "123", ["123", "456"]) == 50.0


def test_sentence_splitter() -> None:
    assert sentences("One. Two!  Three? four") == ["One.", "Two!", "Three?", "four"]


@pytest.mark.parametrize("task", TASKS)
def test_generators_fit_the_budget_and_hide_their_answers(
    task: str, qa: dict[str, QACorpus]
) -> None:
    hay = Haystack(TEXT, words)
    sample = generate(task, hay, 600, seed=3, qa=qa)
    assert sample.task == task and sample.references
    assert 400 <= words(sample.prompt) <= 700, "the prompt fills its budget"
    if task in QA_FILES:
        assert any(ref in sample.prompt for ref in sample.references)
        assert sample.meta["documents"] > 3, "distractor documents surround the golden one"
    else:
        for ref in sample.references:
            assert ref in sample.prompt, f"{task}: reference {ref} is not in the prompt"
    assert generate(task, hay, 600, seed=3, qa=qa) == sample, "a seed gives one sample"
    assert generate(task, hay, 600, seed=4, qa=qa).prompt != sample.prompt


def test_qa_questions_come_with_their_golden_documents(qa: dict[str, QACorpus]) -> None:
    squad = qa["qa_squad"]
    assert len(squad.questions) == 150, "unanswerable SQuAD questions are skipped"
    for question in squad.questions[:20]:
        (doc,) = question.golden
        assert all(answer in squad.docs[doc] for answer in question.answers)
        assert len(question.related) == 4, "the other paragraphs of the same article"
    hotpot = qa["qa_hotpotqa"].questions[7]
    assert len(hotpot.golden) == 2 and hotpot.answers == ["Founder7"]


def test_qa_task_without_its_corpus_is_refused() -> None:
    with pytest.raises(ValueError, match=r"qa_squad needs its QA corpus \(squad.json\)"):
        generate("qa_squad", Haystack(TEXT, words), 600, seed=0)


def test_niah_multikey_asks_a_key_anywhere_among_the_needles() -> None:
    """RULER shuffles the needles and draws the asked key: its needle is not always the
    first one in the text (the one farthest from the question)."""
    ranks = set()
    for seed in range(12):
        sample = generate("niah_multikey", Haystack(TEXT, words), 800, seed=seed)
        keys = sample.meta["keys"]
        (value,) = sample.references
        asked = next(k for k in keys if f"for {k} is: {value}." in sample.prompt)
        assert f"numbers for {asked} mentioned" in sample.prompt
        by_place = sorted(keys, key=lambda k: sample.prompt.index(f"numbers for {k} is"))
        ranks.add(by_place.index(asked))
    assert len(ranks) >= 3, ranks


@pytest.mark.parametrize("task", [t for t in TASKS if t.startswith("niah")])
def test_niah_records_where_each_asked_value_sits(task: str) -> None:
    for seed in range(4):
        sample = generate(task, Haystack(TEXT, words), 800, seed=seed)
        depths = sample.meta["depths"]
        assert len(depths) == len(sample.references) and all(0 < d < 1 for d in depths)
        by_text = sorted(sample.references, key=sample.prompt.index)
        assert [v for _, v in sorted(zip(depths, sample.references, strict=True))] == by_text


def test_places_count_the_needles_a_config_loses_by_place() -> None:
    """Config b misses the first of four values in the text on every multi-value prompt
    and one single needle in the first fifth; a record without depths is skipped."""
    from eval_ruler import needle_places, parse_args

    values = ["1111111", "2222222", "3333333", "4444444"]
    depths = [0.6, 0.2, 0.9, 0.4]  # the text's order: 2222222 first

    def records(missing: set[str]) -> list[dict]:
        multi = {"task": "niah_multivalue", "length": 64, "references": values, "depths": depths}
        single = {"task": "niah_single", "length": 64, "references": ["5555555"], "depths": [0.1]}
        out = [
            {**r, "prediction": " ".join(v for v in r["references"] if v not in missing)}
            for r in [multi] * 3 + [single]
        ]
        return [*out, {"task": "niah_single", "length": 64, "references": ["6"], "prediction": ""}]

    results = {"dense": records(set()), "b": records({"2222222", "5555555"})}
    places = needle_places(results, "b", "dense", [64])
    got = {(p["task"], p["place"]): (p["asked"], p["won"], p["lost"]) for p in places}
    assert got == {
        ("niah_multivalue", "value 1"): (3, 0, 3),
        ("niah_multivalue", "value 2"): (3, 0, 0),
        ("niah_multivalue", "value 3"): (3, 0, 0),
        ("niah_multivalue", "value 4"): (3, 0, 0),
        ("niah_single", "depth 0%+"): (1, 0, 1),
    }
    assert {p["configs"] == ["b", "dense"] for p in places} == {True}
    with pytest.raises(ValueError, match="--places: no config named 'c'"):
        needle_places(results, "b", "c", [64])
    args, _, _ = parse_args(["--combine", "r.json", "--places", "b", "dense"])
    assert args.places == [["b", "dense"]]


def test_niah_multiquery_asks_for_every_key() -> None:
    sample = generate("niah_multiquery", Haystack(TEXT, words), 800, seed=1)
    assert len(sample.references) == 4 and all(k in sample.prompt for k in sample.meta["keys"])


# counters of a 600-token prompt: layer 0 ran sparse, layer 1 fell back for half of it
STATS_OF_TWO_LAYERS = {
    "layer.0": {"sparse_prefill_tokens": 600, "dense_prefill_tokens": 0},
    "layer.1": {
        "sparse_prefill_tokens": 300,
        "dense_prefill_tokens": 300,
        "prompt_length_unknown_tokens": 200,
    },
}


def test_summary_scores_each_length_against_the_first_config() -> None:
    from eval_ruler import summarize

    def rec(task: str, length: int, score: float, answer: str = "a") -> dict:
        return {"task": task, "length": length, "score": score, "prediction": answer}

    results = {
        "dense": [rec("vt", 64, 80.0), rec("vt", 64, 40.0), rec("cwe", 64, 30.0)],
        "sparse": [
            rec("vt", 64, 60.0, "b"),
            rec("vt", 64, 40.0, " a "),
            rec("cwe", 64, 15.0, "c"),
            {"length": 64, "stats": STATS_OF_TWO_LAYERS, "density": 0.25},
        ],
    }
    table = summarize(results, ["vt", "cwe"], [64])
    assert table["dense"][64] == {
        "vt": 60.0,
        "cwe": 30.0,
        "average": 45.0,
        "density": 1.0,
        "fallback": 0.0,
        "unrouted": 0.0,
        "of_reference": 100.0,
        "of_reference_ci": (100.0, 100.0),
        "same_answer": 100.0,
    }
    assert table["sparse"][64]["average"] == 32.5
    assert table["sparse"][64]["of_reference"] == pytest.approx(100 * 32.5 / 45)
    assert table["sparse"][64]["density"] == 0.25
    assert table["sparse"][64]["same_answer"] == pytest.approx(100 / 3)  # the second, stripped
    assert table["sparse"][64]["fallback"] == pytest.approx(300 / 1200)  # layer 1's step fell back
    assert table["sparse"][64]["unrouted"] == pytest.approx(200 / 1200)  # no prompt lengths
    low, high = table["sparse"][64]["of_reference_ci"]
    assert low < 100 * 32.5 / 45 < high <= 100.0  # never better than dense on any sample


def test_the_interval_narrows_with_more_samples_and_pairs_them() -> None:
    from eval_ruler import paired_interval

    def records(scores: list[float]) -> list[dict]:
        return [{"task": "vt", "length": 64, "score": s} for s in scores]

    dense = records([100.0, 0.0] * 50)
    one_flip = records([0.0, 100.0] + [100.0, 0.0] * 49)  # one answer lost, another gained
    low, high = paired_interval(dense, one_flip, ["vt"], 64)
    assert low < 100.0 < high
    assert paired_interval(dense, dense, ["vt"], 64) == (100.0, 100.0)
    assert all(math.isnan(x) for x in paired_interval(dense, dense[:-1], ["vt"], 64))
    worse = records([0.0] * 10 + [100.0, 0.0] * 45)  # 5 of 50 right answers lost
    few = paired_interval(dense[:20], worse[:20], ["vt"], 64)
    many = paired_interval(dense, worse, ["vt"], 64)
    assert many[1] < 100.0 and many[1] - many[0] < few[1] - few[0]


def test_two_sparse_configs_compare_on_the_same_prompts() -> None:
    from eval_ruler import paired_ratios, parse_args, summarize

    def records(scores: list[float]) -> list[dict]:
        return [{"task": "vt", "length": 64, "score": s, "prediction": ""} for s in scores]

    results = {
        "dense": records([100.0] * 40),
        "a": records([100.0] * 36 + [0.0] * 4),
        "b": records([100.0] * 30 + [0.0] * 10),
    }
    table = summarize(results, ["vt"], [64])
    (ratio,) = paired_ratios(results, table, [("a", "b")], ["vt"], [64])
    assert ratio["configs"] == ["a", "b"] and ratio["length"] == 64
    assert ratio["ratio"] == pytest.approx(100 * 90 / 75)
    low, high = ratio["ci"]
    assert 100.0 < low < ratio["ratio"] < high  # a keeps every answer b keeps, and more
    with pytest.raises(ValueError, match="--ratio: no config named 'c'"):
        paired_ratios(results, table, [("a", "c")], ["vt"], [64])
    args, _, _ = parse_args(["--combine", "r.json", "--ratio", "a", "b", "--ratio", "b", "a"])
    assert args.ratio == [["a", "b"], ["b", "a"]]


def test_runs_combine_into_one_with_more_samples() -> None:
    from eval_ruler import combine, summarize

    def rec(score: float, tokens: int) -> dict:
        return {
            "task": "vt",
            "length": 64,
            "score": score,
            "prediction": "a",
            "prompt_tokens": tokens,
            "references": ["1"],
        }

    def stats(selected: int, causal: int) -> dict:
        layer = {
            "sparse_prefill_tokens": 10,
            "dense_prefill_tokens": 0,
            "selected_blocks": selected,
            "causal_blocks": causal,
        }
        return {"stats": {"layer.1": {**layer, "mean_density": selected / causal}}}

    first = {
        "records": {
            "dense": [rec(100.0, 50), rec(0.0, 51)],
            "sparse": [
                rec(100.0, 50),
                rec(0.0, 51),
                {"length": 64, "density": 0.75, **stats(1, 2)},
            ],
        }
    }  # two layers, layer 0 dense: (0.5 + 1) / 2 = 0.75; no num_layers stored yet
    second = {
        "records": {
            "dense": [rec(100.0, 52), rec(100.0, 53)],
            "sparse": [
                rec(0.0, 52),
                rec(100.0, 53),
                {"length": 64, "density": 0.6, "num_layers": 2, **stats(3, 30)},
            ],
        }
    }
    # A counter added since the first run (its records lack it) sums from the run that has it.
    second["records"]["sparse"][-1]["stats"]["layer.1"]["prompt_length_unknown_tokens"] = 5
    second["records"]["later"] = second["records"]["dense"]  # in one run only: left out
    results = combine([first, second])
    assert list(results) == ["dense", "sparse"]
    table = summarize(results, ["vt"], [64])
    assert table["dense"][64]["average"] == 75.0 and table["sparse"][64]["average"] == 50.0
    assert table["sparse"][64]["density"] == pytest.approx((4 / 32 + 1) / 2)  # counters summed
    assert table["sparse"][64]["unrouted"] == pytest.approx(5 / 20)
    assert table["sparse"][64]["same_answer"] == 100.0  # predictions pair over all four

    third = {"records": {"late": first["records"]["dense"] + second["records"]["dense"]}}
    assert list(combine([first, second, third])) == ["dense", "sparse", "late"]  # all four

    # A run lists its prompts task by task: samples 0-1 then 2-3 of two tasks, against all
    # four of each task in one run, pair once grouped by task.
    def run(tasks_tokens: list[tuple[str, int]]) -> list[dict]:
        return [{**rec(100.0, tokens), "task": task} for task, tokens in tasks_tokens]

    split = [
        {"records": {"dense": run([("vt", 1), ("vt", 2), ("cwe", 1), ("cwe", 2)])}},
        {"records": {"dense": run([("vt", 3), ("vt", 4), ("cwe", 3), ("cwe", 4)])}},
    ]
    whole = [("vt", 1), ("vt", 2), ("vt", 3), ("vt", 4), ("cwe", 1), ("cwe", 2), ("cwe", 3)]
    one_run = {"records": {"whole": run([*whole, ("cwe", 4)])}}
    assert list(combine([*split, one_run])) == ["dense", "whole"]
    one_run["records"]["whole"] = run([*whole, ("cwe", 5)])  # a prompt the reference lacks
    assert list(combine([*split, one_run])) == ["dense"]
    longer = {**rec(100.0, 90), "length": 128}
    first["records"]["dense"].append(longer)  # the reference also ran 128, the others not
    assert list(combine([first, second, third])) == ["dense"]
    results = combine([first, second, third], lengths=[64])
    assert list(results) == ["dense", "sparse", "late"] and longer not in results["dense"]
    first["records"]["dense"].remove(longer)
    second["records"]["sparse"][0]["prompt_tokens"] = 99  # not the reference's prompt
    assert list(combine([first, second])) == ["dense"]


def test_rounds_give_every_task_its_first_samples_and_a_cut_run_combines() -> None:
    from eval_ruler import combine, rounds

    # two tasks of three samples (task by task: 0-2, 3-5), one sample of each per round
    assert rounds(6, 3, 1) == [[0, 3], [1, 4], [2, 5]]
    assert rounds(6, 3, 2) == [[0, 1, 3, 4], [2, 5]]
    assert rounds(6, 3, 0) == rounds(6, 3, 10) == [[0, 1, 2, 3, 4, 5]]

    def records(tokens: list[int]) -> list[dict]:
        rows = [("vt", t) for t in tokens] + [("cwe", t + 100) for t in tokens]
        return [
            {
                "task": task,
                "length": 64,
                "score": 1.0,
                "prediction": "a",
                "prompt_tokens": t,
                "references": ["1"],
            }
            for task, t in rows
        ]

    whole = {"records": {"dense": records([1, 2, 3]), "sparse": records([1, 2, 3])}}
    cut = {"records": {"cut short": records([1, 2])}}  # a partial.json: 2 rounds of 1
    assert list(combine([whole, cut])) == ["dense", "sparse"]  # 2 prompts of 3 do not pair
    paired = combine([whole, cut], first_samples=2)
    assert list(paired) == ["dense", "sparse", "cut short"]
    assert [r["prompt_tokens"] for r in paired["dense"]] == [1, 2, 101, 102]
    assert len(whole["records"]["dense"]) == 6  # the runs themselves are not cut

    # Two runs of three samples each (seeds 0 and 3) and a config cut short after one round
    # in each. Sample 3 makes the same prompt as sample 1 (the generator can repeat one):
    # only the sample numbers, from each run's seed, say that the cut config answered 0 and
    # 3, not 0 and 1. So --first-samples 2 leaves it out (its second sample is 3, the
    # others' is 1), and common prompts pair samples 0 and 3 of every config.
    def run(seed: int, **configs: list[dict]) -> dict:
        return {"args": {"seed": seed}, "records": configs}

    halves = [
        run(0, dense=records([7, 2, 3]), sparse=records([7, 2, 3])),
        run(0, **{"cut short": records([7])}),
        run(3, dense=records([2, 5, 6]), sparse=records([2, 5, 6])),
        run(3, **{"cut short": records([2])}),
    ]
    assert list(combine(halves)) == ["dense", "sparse"]
    assert list(combine(halves, first_samples=2)) == ["dense", "sparse"]
    paired = combine(halves, common_prompts=True)
    assert list(paired) == ["dense", "sparse", "cut short"]
    for name in paired:
        scored = [r for r in paired[name] if "task" in r]
        assert [r["sample"] for r in scored] == [0, 3, 0, 3]
        assert [r["prompt_tokens"] for r in scored] == [7, 2, 107, 102]


def test_prompts_are_made_once_in_parallel_in_generation_order(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import eval_ruler
    from tiny_model import build_tiny_llama

    haystack = tmp_path / "essay.txt"
    haystack.write_text(TEXT)
    spec = {
        "model": str(build_tiny_llama(tmp_path / "tiny")),
        "haystack": str(haystack),
        "qa_data": str(write_qa_data(tmp_path / "qa")),
        "tasks": ["niah_single", "vt", "qa_squad"],
        "lengths": [512, 700],
        "samples": 2,
        "seed": 7,
    }
    made = eval_ruler.make_prompts(spec, processes=2)
    eval_ruler._load_sources(spec["model"], spec["haystack"], spec["qa_data"], spec["tasks"])
    for length in spec["lengths"]:  # what one engine used to make for itself, in its order
        budget = length - eval_ruler.ANSWER_TOKENS - 64
        items = [(t, budget, 7 + i) for t in spec["tasks"] for i in range(2)]
        assert made[str(length)] == [eval_ruler._make_prompt(item) for item in items]
    assert made["512"][0]["prompt"] != made["512"][1]["prompt"]  # seeds differ per sample


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
                "mode": "topk",  # random weights attend flatly: top-p would keep every block
                "density": 0.3,
                "dense_above_density": None,
            },
        },
    ]
    configs.append({"name": "broken", "backend": "unisparse", "unisparse": {"tau": 1.7}})
    result = run_benchmark(
        "eval_ruler.py",
        [
            "--model",
            str(model),
            "--haystack",
            str(haystack),
            "--lengths",
            "512",
            "--samples",
            "2",
            "--checkpoint-samples",
            "1",
            "--tasks",
            "niah_single",
            "vt",
            "qa_squad",
            "--qa-data",
            str(write_qa_data(tmp_path / "qa")),
            "--configs",
            json.dumps(configs),
            "--engine-args",
            json.dumps({"enforce_eager": True, "dtype": "float32"}),
            "--places",
            "unisparse",
            "dense",
            "--out-dir",
            str(tmp_path / "out"),
        ],
        timeout=900,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    # A config that fails costs only itself: the others are scored and written, the run
    # exits non-zero naming it.
    assert result.returncode != 0
    assert "config 'broken' failed" in result.stderr, result.stderr[-3000:]
    assert "failed configs (left out above): broken" in result.stderr
    broken_log = next((tmp_path / "out" / "configs").glob("2.log")).read_text()
    assert "tau = 1.7" in broken_log
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(report["table"]) == {"dense", "unisparse"}
    # the run records what it ran (benchmarks/match_density.py reads the taus from it)
    assert report["args"]["configs"] == configs
    for per_length in report["table"].values():
        assert 0.0 <= per_length["512"]["average"] <= 100.0
    (sparse,) = [r for r in report["records"]["unisparse"] if "stats" in r]
    assert any(v["sparse_prefill_tokens"] for v in sparse["stats"].values())
    assert 0.0 < report["table"]["unisparse"]["512"]["density"] < 1.0
    assert report["table"]["dense"]["512"]["density"] == 1.0
    assert {r["task"] for r in report["records"]["dense"]} == {"niah_single", "vt", "qa_squad"}
    niah = [r for r in report["records"]["dense"] if r["task"] == "niah_single"]
    assert all(len(r["depths"]) == 1 for r in niah)
    assert sum(p["asked"] for p in report["places"]) == 2  # the two NIAH prompts, by depth
    assert {p["task"] for p in report["places"]} == {"niah_single"}
    assert "average" in result.stdout
    # Answered in two rounds of one sample per task; the checkpoint after the second holds
    # what the run reports, task by task, as a results.json of the config alone.
    checkpoint = json.loads((tmp_path / "out" / "configs" / "1.partial.json").read_text())
    assert checkpoint["args"]["answered_samples"] == 2
    assert checkpoint["records"] == {"unisparse": report["records"]["unisparse"]}
    assert [r["task"] for r in report["records"]["dense"]] == [
        "niah_single",
        "niah_single",
        "vt",
        "vt",
        "qa_squad",
        "qa_squad",
    ]


def test_parallel_configs_are_spread_over_the_gpus(tmp_path: Path, monkeypatch) -> None:
    """``--gpus 2``: the n-th config's engine sees GPU ``n % 2`` only; one GPU: untouched."""
    import eval_ruler

    seen: dict[str, str | None] = {}

    class FakeEngine:  # stands in for the worker process: records its GPU, writes a result
        def __init__(self, argv: list[str], env: dict[str, str], **_: object) -> None:
            spec = json.loads(argv[-1])
            seen[spec["name"]] = env.get("CUDA_VISIBLE_DEVICES")
            Path(spec["result_file"]).write_text("[]")
            self.returncode = 0

        def wait(self) -> int:
            return 0

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(eval_ruler.subprocess, "Popen", FakeEngine)
    specs = [{"name": f"c{n}"} for n in range(5)]
    results = eval_ruler.run_configs(specs, 3, tmp_path / "two", gpus=2)
    assert set(results) == {f"c{n}" for n in range(5)}
    assert seen == {"c0": "0", "c1": "1", "c2": "0", "c3": "1", "c4": "0"}
    eval_ruler.run_configs(specs, 5, tmp_path / "one")
    assert set(seen.values()) == {None}


def test_spec_file_sets_options_and_the_command_line_wins(tmp_path: Path) -> None:
    from eval_ruler import parse_args

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "lengths: [1024, 2048]\nsamples: 3\ntasks: [niah_single, vt]\nhaystack: essays\n"
        "engine_args: {enforce_eager: true}\n"
        "configs:\n  - name: dense\n  - {name: sparse, backend: unisparse, unisparse: {tau: 0.8}}\n"
    )
    args, configs, engine_args = parse_args(["--spec", str(spec), "--model", "m", "--samples", "5"])
    assert (args.lengths, args.samples, args.tasks) == ([1024, 2048], 5, ["niah_single", "vt"])
    assert args.haystack == Path("essays") and engine_args == {"enforce_eager": True}
    assert configs[1] == {"name": "sparse", "backend": "unisparse", "unisparse": {"tau": 0.8}}
    _, configs, _ = parse_args(["--spec", str(spec), "--model", "m", "--only", "sparse"])
    assert [c["name"] for c in configs] == ["sparse"]


def test_a_configs_engine_args_add_to_the_runs(tmp_path: Path, capsys) -> None:
    from eval_ruler import config_spec, parse_args

    base = {"model": "m", "engine_args": {"enforce_eager": True, "kv_cache_memory_bytes": 4}}
    chunked = {"name": "one chunk", "engine_args": {"max_num_batched_tokens": 32768}}
    assert config_spec(base, chunked)["engine_args"] == {
        "enforce_eager": True,
        "kv_cache_memory_bytes": 4,
        "max_num_batched_tokens": 32768,
    }
    assert config_spec(base, {"name": "plain"})["engine_args"] == base["engine_args"]
    assert base["engine_args"] == {"enforce_eager": True, "kv_cache_memory_bytes": 4}
    spec = tmp_path / "spec.yaml"
    spec.write_text("configs: [{name: dense}, {name: b, engine_args: [1]}]\n")
    with pytest.raises(SystemExit):
        parse_args(["--spec", str(spec), "--model", "m", "--haystack", "h", "--qa-data", "q"])
    assert "engine_args of config(s) 'b': not a mapping" in capsys.readouterr().err


SPECS = sorted(p for p in (BENCH / "ruler_specs").glob("*.yaml") if "configs:" in p.read_text())


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_shipped_specs_parse(monkeypatch, spec: Path) -> None:
    from eval_ruler import parse_args

    args, configs, _ = parse_args(
        ["--spec", str(spec), "--model", "m", "--haystack", "h", "--qa-data", "q"]
    )
    assert args.lengths and "backend" not in configs[0]
    assert len({c["name"] for c in configs}) == len(configs) > 1
    from unisparse_vllm.config import resolve_config

    monkeypatch.chdir(BENCH.parent)  # the spec's profile paths are relative to the repository
    for config in configs:  # every budget loads (a bad profile path would cost a GPU run)
        resolve_config(config.get("unisparse", {}))


@pytest.mark.parametrize(
    "text,message",
    [
        ("lenghts: [1024]\n", "unknown key(s) lenghts"),
        ("tasks: [niah_single, sudoku]\n", "tasks: unknown sudoku"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("configs: [{backend: unisparse}]\n", "each with a name"),
        ("configs: [{name: a}, {name: a, backend: unisparse}]\n", "unique: a repeats"),
        ("configs: [{name: a}]\nonly: [b]\n", "--only: no config named 'b'"),
    ],
)
def test_bad_spec_file_is_refused_naming_the_problem(tmp_path: Path, capsys, text, message) -> None:
    from eval_ruler import parse_args

    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    with pytest.raises(SystemExit):
        parse_args(["--spec", str(spec), "--model", "m", "--haystack", "h", "--qa-data", "q"])
    assert message in capsys.readouterr().err


def test_plot_draws_an_interval_that_misses_its_point(tmp_path: Path) -> None:
    """Two samples per task (a density sweep) can give a bootstrap interval beside the point
    estimate; the plot still gets written (it raised in matplotlib and lost the table)."""
    pytest.importorskip("matplotlib")
    from eval_ruler import plot

    row = {"average": 40.0, "density": 0.3, "of_reference": 90.0, "of_reference_ci": [91.0, 95.0]}
    dense = {"average": 44.0, "density": 1.0, "of_reference": 100.0, "of_reference_ci": [100, 100]}
    plot({"dense": {16384: dense}, "sweep": {16384: row}}, [16384], tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0


def test_plot_styles_tell_many_configs_apart() -> None:
    """Twelve configs (the eighth RULER run's 16K table) get twelve different looks; with
    matplotlib's color cycle alone the eleventh looked like the first."""
    from eval_ruler import plot_styles

    styles = plot_styles(70)
    assert len(set(styles)) == 70
    assert styles[10] != styles[0] and styles[10][0] == styles[0][0]  # same color, new marker


def test_runs_of_different_prompt_generators_do_not_combine() -> None:
    """Prompts of another generator version may keep their lengths and references (a
    shuffled multi-value needle list) and still differ: such runs must not pair."""
    from eval_ruler import combine
    from ruler import PROMPT_VERSION

    record = {"task": "vt", "length": 64, "score": 1.0, "prediction": "a", "prompt_tokens": 9}
    old = {"args": {}, "records": {"dense": [{**record, "references": ["1"]}]}}
    new = {"args": {"prompt_version": PROMPT_VERSION}, "records": old["records"]}
    assert PROMPT_VERSION > 1
    with pytest.raises(ValueError, match="generator versions"):
        combine([old, new])
    assert list(combine([new, new])) == ["dense"]
