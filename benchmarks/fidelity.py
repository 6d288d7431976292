"""Fidelity of the UniSparse estimator on real activations (ALGORITHM.md section 9).

Runs a Hugging Face model once over a long prompt (Paul Graham essays), captures every
layer's post-RoPE queries and keys and its values, then for a grid of block size, composite
size and ``tau`` measures per layer: selected density, attention-mass recall (mean and worst
query), relative output error against exact attention, and the Spearman rank correlation of
estimated against exact block mass. CPU is enough for the small models of EVAL-DATA.md.

    python benchmarks/fidelity.py --model /models/smollm2 --essays DIR --tokens 4096 \
        --composite 8 16 8:16 --c-h 1 4 --taus 0.9 0.95 --out fid.json --plot fid.png
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import statistics
from pathlib import Path

import torch

from unisparse_vllm.calibrate import capture_qkv, measuring_device, measuring_dtype
from unisparse_vllm.config import ConfigError, resolve_config
from unisparse_vllm.core import (
    ContiguousKV,
    PrefillBatch,
    exact_attention,
    fidelity,
    plan_prefill,
    sparse_attention,
)
from unisparse_vllm.core.baselines import ESTIMATORS


def long_prompt_ids(tokenizer, essays: Path, tokens: int) -> torch.Tensor:
    text = "\n\n".join(p.read_text(errors="ignore") for p in sorted(essays.glob("*.txt")))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"the essays give only {ids.shape[1]} tokens, asked for {tokens}")
    return ids


METRICS = (
    "density",
    "mass_recall_mean",
    "mass_recall_min",
    "relative_error",
    "rank_correlation_median",
)


GRID = ("estimator", "block", "c_q", "c_k", "c_h", "tau", "max_mix", "local_blocks")


def composite_sizes(text: str) -> tuple[int, int]:
    """``16`` (c_q = c_k = 16) or ``8:16`` (c_q 8, c_k 16)."""
    c_q, _, c_k = text.partition(":")
    try:
        return int(c_q), int(c_k or c_q)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C or CQ:CK, got {text!r}") from None


def label(variant: dict, varying: list[str]) -> str:
    """The grid fields that vary between the variants, as a short legend entry."""
    return " ".join(f"{k}={variant[k]}" for k in varying) or "the one variant"


def plot(rows: list[dict], variants: list[dict], path: Path) -> None:
    """Per layer, each variant's selected density and mass recall (the issue's per-layer
    view; the summary table has the medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varying = [k for k in GRID if len({v[k] for v in variants}) > 1]
    fig, (density_ax, recall_ax) = plt.subplots(1, 2, figsize=(12, 4))
    for variant in variants:
        sel = [r for r in rows if all(r[k] == v for k, v in variant.items())]
        layers = [r["layer"] for r in sel]
        density_ax.plot(
            layers, [r["density"] for r in sel], "-o", ms=3, label=label(variant, varying)
        )
        recall_ax.plot(layers, [r["mass_recall_mean"] for r in sel], "-o", ms=3)
    density_ax.set_ylabel("selected density")
    recall_ax.set_ylabel("attention-mass recall (mean over queries)")
    for ax in (density_ax, recall_ax):
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    density_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--essays", type=Path, required=True, help="folder of .txt essays")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, nargs="*", help="layer indices (default: all)")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[128])
    parser.add_argument(
        "--composite",
        type=composite_sizes,
        nargs="+",
        default=[(8, 8), (16, 16), (32, 32)],
        help="C (c_q = c_k = C) or CQ:CK",
    )
    parser.add_argument("--taus", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--estimators", nargs="+", default=["unisparse"], choices=ESTIMATORS)
    parser.add_argument("--max-mix", type=float, nargs="+", default=[0.0], help="guard weights")
    parser.add_argument(
        "--local-blocks", type=int, nargs="+", help="forced local blocks (default: the config's)"
    )
    parser.add_argument(
        "--c-h", type=int, nargs="+", help="query heads per selection (default: the profile's)"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N"
    )
    parser.add_argument("--out", type=Path, help="JSON: every (layer, variant) row + summary")
    parser.add_argument("--plot", type=Path, help="PNG: density and recall per layer")
    args = parser.parse_args()
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib (pip install -e '.[eval]')")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        device = measuring_device(args.device)
    except ConfigError as err:
        parser.error(str(err))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=measuring_dtype(device))
    model = model.to(device).eval()
    profile = resolve_config(  # the model family's profile: defaults of c_h, local_blocks
        model_type=model.config.model_type, architectures=model.config.architectures or ()
    )
    captured = capture_qkv(model, long_prompt_ids(tokenizer, args.essays, args.tokens).to(device))
    layers = args.layers if args.layers else list(range(len(captured)))
    batch = PrefillBatch.from_lens([args.tokens])
    # One variant per point of the grid; rows and the summary are keyed by these fields.
    variants = [
        dict(zip(GRID, (e, b, c[0], c[1], h, t, m, lb), strict=True))
        for e, b, c, h, t, m, lb in itertools.product(
            args.estimators,
            args.block_sizes,
            args.composite,
            args.c_h or [profile.c_h],
            args.taus,
            args.max_mix,
            args.local_blocks or [profile.local_blocks],
        )
    ]

    rows = []
    for layer in layers:
        query, keys, values = captured[layer]
        scale = 1 / math.sqrt(query.shape[-1])
        kv = ContiguousKV(keys, values, (0,))
        exact = {b: exact_attention(query, kv, batch, b, scale) for b in args.block_sizes}
        for variant in variants:
            config = resolve_config(
                {
                    "block_size": variant["block"],
                    "c_q": variant["c_q"],
                    "c_k": variant["c_k"],
                    "c_h": variant["c_h"],
                    "tau": variant["tau"],
                    "max_mix": variant["max_mix"],
                    "local_blocks": variant["local_blocks"],
                    "min_sparse_tokens": 0,
                    "dense_tail_blocks": 0,
                }
            )
            c_h = config.heads_per_selection(query.shape[1], keys.shape[1])
            estimator = ESTIMATORS[variant["estimator"]]
            estimate = estimator(query, kv, batch, [True], config=config, c_h=c_h, scale=scale)
            plan = plan_prefill(
                query, kv, batch, config, config.for_layer(layer), scale=scale, estimator=estimator
            )
            out = sparse_attention(query, kv, batch, plan, scale)
            fid = fidelity(plan, batch, exact[variant["block"]], out, [estimate])
            row = {"layer": layer, **variant, **fid.__dict__}
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{args.model}: {args.tokens} tokens, median over layers {layers}")
    print(
        f"{'estimator':>10} {'block':>5} {'c_q':>3} {'c_k':>3} {'c_h':>4} {'tau':>5} {'mix':>4} "
        f"{'local':>5} {'density':>8} {'recall':>7} {'recall_min':>10} {'rel_err':>8} "
        f"{'rank_corr':>9}"
    )
    summary = []
    for variant in variants:
        sel = [r for r in rows if all(r[k] == v for k, v in variant.items())]
        med = {k: statistics.median(r[k] for r in sel) for k in METRICS}
        summary.append({**variant, **med})
        print(
            f"{variant['estimator']:>10} {variant['block']:>5} {variant['c_q']:>3} "
            f"{variant['c_k']:>3} {variant['c_h'] or '-':>4} {variant['tau']:>5.2f} "
            f"{variant['max_mix']:>4.2f} {variant['local_blocks']:>5} "
            f"{med['density']:>8.3f} {med['mass_recall_mean']:>7.4f} "
            f"{med['mass_recall_min']:>10.4f} {med['relative_error']:>8.4f} "
            f"{med['rank_correlation_median']:>9.3f}"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {"model": args.model, "tokens": args.tokens, "rows": rows, "summary": summary},
                indent=1,
            )
        )
    if args.plot:
        plot(rows, variants, args.plot)


if __name__ == "__main__":
    main()
