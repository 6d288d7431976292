"""Sweep the sparse attention kernel's launch choices on one GPU (Llama-3.1-8B heads, bf16,
paged K/V page 16) at density 1.0 and 0.1; prints a table, best first per case.

    python benchmarks/tune_attention.py --seq 32768 131072
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math

import torch
import triton
from bench_attention import DIM, HKV, HQ, bench, causal_tflops, fixed_density_plan, paged

from unisparse_vllm.core import PrefillBatch
from unisparse_vllm.kernels.attention import LaunchConfig, sparse_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    results = []
    for seq in args.seq:
        batch = PrefillBatch.from_lens([seq])
        keys = torch.randn(seq, HKV, DIM, device="cuda", dtype=torch.bfloat16)
        kv = paged(keys, torch.randn_like(keys), [seq], gen)
        query = torch.randn(seq, HQ, DIM, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(query)
        for density in (1.0, 0.1):
            plan = fixed_density_plan(batch, density, 128, "cuda")
            for block_n, warps, stages in itertools.product((64, 128), (4, 8), (2, 3, 4)):
                launch = LaunchConfig(block_n, warps, stages)
                run = functools.partial(
                    sparse_attention,
                    query,
                    kv,
                    batch,
                    plan,
                    1 / math.sqrt(DIM),
                    out=out,
                    launch=launch,
                )
                try:
                    ms = bench(run)
                except triton.runtime.errors.OutOfResources as err:
                    print(f"{seq} {density} {launch}: {err}")
                    continue
                row = {
                    "seq": seq,
                    "density": density,
                    "block_n": block_n,
                    "warps": warps,
                    "stages": stages,
                    "ms": ms,
                    "tflops_dense_equiv": causal_tflops([seq], ms) * plan.density(),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    for seq, density in itertools.product(args.seq, (1.0, 0.1)):
        case = sorted(
            (r for r in results if r["seq"] == seq and r["density"] == density),
            key=lambda r: r["ms"],
        )
        print(f"seq {seq} density {density}")
        for r in case[:5]:
            print(
                f"  block_n={r['block_n']:>3} warps={r['warps']} stages={r['stages']}"
                f"  {r['ms']:8.3f} ms  {r['tflops_dense_equiv']:6.1f} TFLOP/s"
            )


if __name__ == "__main__":
    main()
