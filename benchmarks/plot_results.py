"""Plot bench_attention JSON: attention time vs sequence length, FA3 / SDPA / UniSparse.

python benchmarks/plot_results.py benchmarks/results/bench_attention_2026-11-29.json out.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(src: str, dst: str) -> None:
    data = json.loads(Path(src).read_text())
    rows = [r for r in data["rows"] if r["scenario"].startswith("one-shot")]
    seq = [r["query_lens"][0] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("fa3_ms", "FA3 (vLLM)", "k-"), ("sdpa_flash_ms", "SDPA flash (FA2)", "k--")]
    series += [(f"ours_d{d}_ms", f"UniSparse, density {d}", None) for d in (1.0, 0.3, 0.1, 0.05)]
    series += [(f"triton_d{d}_ms", f"Triton kernel, density {d}", ":") for d in (1.0, 0.1)]
    series += [(f"flex_d{d}_ms", f"FlexAttention, density {d}", "-.") for d in (1.0, 0.1)]
    series += [("e2e_ms", "UniSparse end to end, tau 0.9 (structured)", "r-o")]
    for key, label, style in series:
        points = [(s, r[key]) for s, r in zip(seq, rows, strict=True) if key in r]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, style or "-o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens (one sequence, Llama-3.1-8B heads, bf16, paged KV)")
    ax.set_ylabel("prefill attention time per layer (ms)")
    ax.set_title(f"{data['gpu']}, torch {data['torch']}, triton {data['triton']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
