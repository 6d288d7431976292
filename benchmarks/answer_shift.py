"""How far a selection moves the model's answer, without sampling (Hugging Face model, CPU or
GPU, the core reference for the sparse prefill).

RULER's scores are coarse: with 100 samples per task, 99% and 97% of dense sit inside one
interval (benchmarks/RESULTS.md section 4). Here each prompt's dense greedy answer is
generated once, then teacher-forced after the prompt under every config: the prompt is
prefilled through ``core.plan_prefill`` and ``core.sparse_attention`` (its last
``dense_tail_blocks`` blocks dense, as served), the answer tokens attend densely, as decoding
does; a config's ``chunk`` prefills the prompt in steps of that many tokens, each attending
to the cache of the earlier ones, as vLLM's chunked prefill does (``max_num_batched_tokens``
for a prompt alone). Per config: the change of the answer's log-likelihood against dense
(nats per token), KL(dense || config) over the answer positions, the share of answer
positions whose top token is still dense's, and the selected density over the prompt's
rows. Paired and continuous, so a few dozen prompts separate configs that RULER cannot. The
prompts are eval_ruler's (same tasks, lengths and seeds).

    python benchmarks/answer_shift.py --model /models/qwen05 --haystack PaulGrahamEssays/ \\
        --tasks niah_multikey vt --length 16384 --samples 10 --out shift.json \\
        --configs '[{"name": "topk 0.2", "unisparse": {"mode": "topk", "density": 0.2}}]'
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_ruler import DEFAULT_MAX_TOKENS, MAX_TOKENS, make_prompts
from ruler import TASKS

from unisparse_vllm.calibrate import measuring_device
from unisparse_vllm.config import ConfigError, UniSparseConfig, resolve_config
from unisparse_vllm.core import ContiguousKV, PrefillBatch, plan_prefill, sparse_attention

ATTENTION = "unisparse_reference"
# The config the next forward prefills with (None: dense) and its prompt length: the
# attention function below reads them, as HF passes it nothing of ours. It adds up each
# layer's selected and causal blocks over the prompt's rows in ``blocks``.
_FORWARD: dict[str, Any] = {"config": None, "prompt_len": 0, "blocks": {}}


class Budget(NamedTuple):
    """One config of ``--configs``: its UniSparse settings and prefill step (None: one step)."""

    config: UniSparseConfig
    chunk: int | None


def unisparse_reference_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An HF attention function: ``query [1, Hq, n, d]``, ``key``/``value [1, Hkv, C + n, d]``
    (``C`` cached tokens of earlier chunks), post-RoPE; returns ``[1, n, Hq, d]``. Dense
    calls (generation included) go to SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config: UniSparseConfig | None = _FORWARD["config"]
    if config is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"one prompt per forward, got a batch of {query.shape[0]}")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    kv = ContiguousKV(k, v, (0,))
    batch = PrefillBatch.from_lens([q.shape[0]], [k.shape[0] - q.shape[0]])
    scale = scaling if scaling is not None else 1 / math.sqrt(q.shape[-1])
    budget = config.for_layer(module.layer_idx)
    plan = plan_prefill(
        q, kv, batch, config, budget, scale=scale, prompt_lens=(_FORWARD["prompt_len"],)
    )
    prompt_rows = plan.row_block < -(-_FORWARD["prompt_len"] // config.block_size)
    totals = _FORWARD["blocks"].setdefault(module.layer_idx, [0, 0])
    totals[0] += int(plan.counts[:, prompt_rows].sum())
    totals[1] += int((plan.row_block[prompt_rows] + 1).sum()) * plan.counts.shape[0]
    return sparse_attention(q, kv, batch, plan, scale)[None], None


def answer_log_probs(
    model: Any, ids: torch.Tensor, prompt_len: int, budget: Budget | None
) -> torch.Tensor:
    """Log-probabilities ``[answer tokens, vocab]`` predicting each answer token of ``ids``
    (prompt then answer), the prompt prefilled under ``budget`` (None: dense), in steps of
    ``budget.chunk`` tokens; the answer is teacher-forced in the last step (its rows are
    past the prompt's dense tail, so they attend densely either way)."""
    from transformers import DynamicCache

    chunk = budget.chunk if budget and budget.chunk else ids.shape[1]
    starts = list(range(0, prompt_len, chunk))
    bounds = list(zip(starts, [*starts[1:], ids.shape[1]], strict=True))
    answer = ids.shape[1] - prompt_len
    cache = DynamicCache() if len(bounds) > 1 else None
    _FORWARD.update(config=budget.config if budget else None, prompt_len=prompt_len, blocks={})
    try:
        with torch.no_grad():
            for start, end in bounds:
                last = end == ids.shape[1]
                logits = model(
                    ids[:, start:end],
                    past_key_values=cache,
                    use_cache=cache is not None,
                    logits_to_keep=answer + 1 if last else 1,
                ).logits[0, :-1]
    finally:
        _FORWARD.update(config=None, prompt_len=0)
    return torch.log_softmax(logits.float(), dim=-1)


METRICS = ("log_likelihood_change", "kl", "top1_kept", "density")


def prefill_density() -> float:
    """The last sparse prefill's selected share of causal blocks over the prompt's rows, the
    mean over layers (a dense layer counts 1, as in eval_ruler)."""
    layers = _FORWARD["blocks"].values()
    return statistics.mean(selected / causal for selected, causal in layers)


def shift(dense: torch.Tensor, other: torch.Tensor, answer: torch.Tensor) -> dict[str, float]:
    """One prompt's ``METRICS`` of ``other`` against ``dense`` (both ``answer_log_probs``)."""
    positions = torch.arange(answer.shape[0], device=answer.device)
    return {
        "log_likelihood_change": float(
            (other[positions, answer] - dense[positions, answer]).mean()
        ),
        "kl": float((dense.exp() * (dense - other)).sum(-1).mean()),
        "top1_kept": float((other.argmax(-1) == dense.argmax(-1)).float().mean()),
    }


def run(args: argparse.Namespace, configs: list[dict]) -> dict:
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = measuring_device(args.device)
    model_type = AutoConfig.from_pretrained(args.model).model_type
    # Every config resolved before the model loads: a bad value costs no load.
    resolved = {
        c["name"]: Budget(
            resolve_config(c.get("unisparse", {}), model_type=model_type), c.get("chunk")
        )
        for c in configs
    }
    AttentionInterface.register(ATTENTION, unisparse_reference_attention)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model: Any = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation=ATTENTION
    )
    model = model.to(device).eval()
    spec = {
        "model": args.model,
        "haystack": str(args.haystack),
        "qa_data": str(args.qa_data),
        "tasks": args.tasks,
        "lengths": [args.length],
        "samples": args.samples,
        "seed": args.seed,
    }
    rows = []
    for prompt in make_prompts(spec, args.processes)[str(args.length)]:
        ids = tokenizer(prompt["prompt"], return_tensors="pt").input_ids.to(device)
        prompt_len = ids.shape[1]
        with torch.no_grad():
            generated = model.generate(
                ids,
                max_new_tokens=MAX_TOKENS.get(prompt["task"], DEFAULT_MAX_TOKENS),
                do_sample=False,
            )
        answer = generated[0, prompt_len:]
        dense = answer_log_probs(model, generated, prompt_len, None)
        row: dict[str, Any] = {
            "task": prompt["task"],
            "prompt_tokens": prompt_len,
            "answer": tokenizer.decode(answer),
        }
        for name, budget in resolved.items():
            other = answer_log_probs(model, generated, prompt_len, budget)
            row[name] = {**shift(dense, other, answer), "density": prefill_density()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"args": spec, "configs": configs, "rows": rows, "summary": summarize(rows, resolved)}


def summarize(rows: list[dict], configs: dict[str, Budget]) -> dict[str, dict]:
    """Per config: each metric's mean over prompts and its standard error."""
    summary = {}
    for name in configs:
        summary[name] = {}
        for metric in METRICS:
            values = [r[name][metric] for r in rows]
            spread = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
            summary[name][metric] = {"mean": statistics.mean(values), "stderr": spread}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--haystack", type=Path, required=True, help="essay .txt folder or file")
    parser.add_argument("--qa-data", type=Path, help="folder with squad.json and hotpotqa.json")
    parser.add_argument("--tasks", nargs="+", default=["niah_multikey"], choices=TASKS)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=5, help="prompts per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--configs",
        required=True,
        help='JSON list of {"name": ..., "unisparse": {...}, "chunk": tokens per prefill '
        "step (default: the whole prompt)}; dense is the reference",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--processes", type=int, default=1, help="for making the prompts")
    parser.add_argument("--out", type=Path, help="JSON: per prompt and config, and the summary")
    args = parser.parse_args()
    try:
        configs = json.loads(args.configs)
    except json.JSONDecodeError as err:
        parser.error(f"--configs must be JSON: {err}")
    if not isinstance(configs, list) or not all(
        isinstance(c, dict) and "name" in c for c in configs
    ):
        parser.error("--configs must be a list of objects, each with a name")
    for c in configs:
        chunk = c.get("chunk")
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            parser.error(f"config {c['name']!r}: chunk = {chunk!r}: must be a positive integer")
    try:
        result = run(args, configs)
    except ConfigError as err:
        parser.error(str(err))
    print(f"\n{'config':<32} {'d log-lik/token':>16} {'KL':>10} {'top-1 kept':>10} {'density':>8}")
    for name, metrics in result["summary"].items():
        ll, kl, top1, density = (metrics[m] for m in METRICS)
        print(
            f"{name:<32} {ll['mean']:>+9.4f}±{ll['stderr']:.4f} {kl['mean']:>10.4f} "
            f"{top1['mean']:>10.3f} {density['mean']:>8.3f}"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
