"""Prefill attention on one GPU: FA3 (vLLM's build), torch SDPA flash (FA2), FlexAttention
with our plans as its block mask, and UniSparse at fixed densities and end to end ("ours":
the kernels' dispatch: FA3 over the plan's virtual sequences where vLLM's FA3 runs and the
step is large enough, else the Triton kernel; "triton":
our Triton attention kernel; "flash": FA3 over the virtual sequences, forced).
Llama-3.1-8B head shapes, bf16, paged K/V (page 16, shuffled pages; SDPA and FlexAttention
read contiguous K/V). Prints a table last; writes JSON (and a PNG if matplotlib is there).

    python benchmarks/bench_attention.py --seq 8192 32768 131072 --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import triton

from unisparse_vllm import kernels
from unisparse_vllm.config import resolve_config
from unisparse_vllm.core import BlockPlan, PagedKV, PrefillBatch, relative_error, select_blocks
from unisparse_vllm.core.plan import request_rows
from unisparse_vllm.kernels import flash
from unisparse_vllm.kernels.attention import sparse_attention as triton_attention
from unisparse_vllm.kernels.estimate import batch_block_mass
from unisparse_vllm.synthetic import structured_qkv

HQ, HKV, DIM, PAGE = 32, 8, 128, 16
DENSITIES = (1.0, 0.3, 0.2, 0.1, 0.05)
FLEX_DENSITIES = (1.0, 0.1)  # FlexAttention on the same plans (each density compiles anew)
# each attention forced, where "ours" is the dispatch's choice: the crossover of the two
EXECUTOR_DENSITIES = (1.0, 0.1)
try:  # FA3 as vLLM builds it; without vLLM the FA3 column is left out
    import vllm.vllm_flash_attn  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def causal_tflops(seq_lens: list[int], ms: float, query_lens: list[int] | None = None) -> float:
    query_lens = query_lens or seq_lens
    pairs = sum(n * (s - n) + n * (n + 1) / 2 for s, n in zip(seq_lens, query_lens, strict=True))
    return 4 * pairs * HQ * DIM / (ms * 1e-3) / 1e12


def paged(
    keys: torch.Tensor, values: torch.Tensor, seq_lens: list[int], gen: torch.Generator
) -> PagedKV:
    """One request per entry of ``seq_lens``; keys/values packed ``[sum(seq_lens), Hkv, d]``."""
    pages = [math.ceil(s / PAGE) for s in seq_lens]
    order = torch.randperm(sum(pages), generator=gen).to(keys.device)
    key_cache = keys.new_empty(sum(pages), PAGE, HKV, DIM).normal_()
    value_cache = torch.empty_like(key_cache).normal_()
    table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32, device=keys.device)
    start, used = 0, 0
    for r, (s, p) in enumerate(zip(seq_lens, pages, strict=True)):
        ids = order[used : used + p]
        table[r, :p] = ids.int()
        pad = p * PAGE - s
        key_cache[ids] = torch.nn.functional.pad(
            keys[start : start + s], (0, 0, 0, 0, 0, pad)
        ).view(p, PAGE, HKV, DIM)
        value_cache[ids] = torch.nn.functional.pad(
            values[start : start + s], (0, 0, 0, 0, 0, pad)
        ).view(p, PAGE, HKV, DIM)
        start, used = start + s, used + p
    return PagedKV(key_cache, value_cache, table)


def fa3(query, kv: PagedKV, batch: PrefillBatch, scale: float):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    dev = query.device
    cu_q = torch.tensor(batch.query_start, dtype=torch.int32, device=dev)
    seq = torch.tensor(batch.seq_lens, dtype=torch.int32, device=dev)
    out = torch.empty_like(query)

    def run():
        flash_attn_varlen_func(
            q=query,
            k=kv.key_cache,
            v=kv.value_cache,
            out=out,
            cu_seqlens_q=cu_q,
            max_seqlen_q=max(batch.query_lens),
            seqused_k=seq,
            max_seqlen_k=max(batch.seq_lens),
            softmax_scale=scale,
            causal=True,
            block_table=kv.block_table,
            fa_version=3,
        )

    return run, out


def sdpa_flash(query, keys, values, scale):
    """One sequence, contiguous K/V (SDPA has no paged input)."""
    q = query.transpose(0, 1)[None]
    k = keys.transpose(0, 1)[None].repeat_interleave(HQ // HKV, dim=1)
    v = values.transpose(0, 1)[None].repeat_interleave(HQ // HKV, dim=1)

    def run():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    return run


def flex_block_mask(plan: BlockPlan, seq_len: int):
    """``plan`` (one request, one-shot prefill) as FlexAttention's ``BlockMask`` over the
    query heads: selected blocks left of the diagonal are full blocks, the diagonal block
    a causal partial one. Plan and FlexAttention use the same block size. The mask function
    also reads the selection, so the mask is exact where FlexAttention ignores the block
    tables (its eager path); compiled, it runs on the diagonal blocks only."""
    from torch.nn.attention.flex_attention import BlockMask

    rows = plan.row_block.long()[None, :, None]  # [1, R, 1]
    indices = plan.indices.long()
    selected = torch.arange(indices.shape[-1], device=indices.device) < plan.counts[..., None]
    # indices ascend, so the blocks left of the diagonal come first and the diagonal last
    full_counts = (selected & (indices < rows)).sum(-1)
    diagonal = (selected & (indices == rows)).any(-1)
    diagonal_index = torch.zeros_like(indices)  # FlexAttention wants a full-width table
    diagonal_index[..., 0] = rows[..., 0]

    def per_query_head(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(plan.heads_per_selection, dim=0)[None].int().contiguous()

    block = plan.block_size
    chosen = plan.block_mask(0, indices.shape[-1]).repeat_interleave(plan.heads_per_selection, 0)

    return BlockMask.from_kv_blocks(
        per_query_head(diagonal),
        per_query_head(diagonal_index),
        per_query_head(full_counts),
        per_query_head(indices.clamp(min=0)),
        BLOCK_SIZE=plan.block_size,
        mask_mod=lambda b, h, q, k: (q >= k) & chosen[h, q // block, k // block],
        seq_lengths=(seq_len, seq_len),
    )


def flex(query, keys, values, scale, block_mask):
    """One sequence, contiguous K/V, FlexAttention compiled (its fast path)."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    q, k, v = (t.transpose(0, 1)[None].contiguous() for t in (query, keys, values))
    return lambda: compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


def fixed_density_plan(batch: PrefillBatch, density: float, block: int, device) -> BlockPlan:
    """A top-k plan over random mass: the cost of attention at a given density."""
    config = resolve_config({"block_size": block, "mode": "topk", "density": density})
    row_request, row_block = request_rows(batch, block)
    width = math.ceil(max(batch.seq_lens) / block)
    mass = torch.rand(HKV, len(row_block), width, device=device)
    mass = mass * (
        torch.arange(width, device=device)[None, None] <= row_block.to(device)[None, :, None]
    )
    counts, indices = select_blocks(mass, row_block.to(device), config.for_layer(0))
    return BlockPlan(
        block, HQ // HKV, counts, indices, row_request.to(device), row_block.to(device)
    )


def scenario(name: str, query_lens: list[int], context_lens: list[int], args, gen) -> dict:
    device = "cuda"
    batch = PrefillBatch.from_lens(query_lens, context_lens)
    seq_lens = list(batch.seq_lens)
    scale = 1 / math.sqrt(DIM)
    total = sum(seq_lens)
    keys = torch.randn(total, HKV, DIM, device=device, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    kv = paged(keys, values, seq_lens, gen)
    query = torch.randn(batch.num_tokens, HQ, DIM, device=device, dtype=torch.bfloat16)
    row = {"scenario": name, "query_lens": query_lens, "context_lens": context_lens}

    if HAVE_VLLM:
        run, _ = fa3(query, kv, batch, scale)
        row["fa3_ms"] = bench(run)
    if len(seq_lens) == 1 and context_lens == [0]:
        row["sdpa_flash_ms"] = bench(sdpa_flash(query, keys, values, scale))

    out = torch.empty_like(query)
    for density in DENSITIES:
        plan = fixed_density_plan(batch, density, 128, device)
        row[f"ours_d{density}_ms"] = bench(
            lambda p=plan: kernels.sparse_attention(query, kv, batch, p, scale, out=out)
        )
        row[f"ours_d{density}_measured_density"] = plan.density()
        if density in EXECUTOR_DENSITIES:
            row[f"triton_d{density}_ms"] = bench(
                lambda p=plan: triton_attention(query, kv, batch, p, scale, out=out)
            )
            if HAVE_VLLM:
                row[f"flash_d{density}_ms"] = bench(
                    lambda p=plan: flash.sparse_attention(query, kv, batch, p, scale, out=out)
                )
        if len(seq_lens) == 1 and context_lens == [0] and density in FLEX_DENSITIES:
            try:  # a FlexAttention failure (compile, memory) costs its column, not the run
                mask = flex_block_mask(plan, seq_lens[0])
                row[f"flex_d{density}_ms"] = bench(flex(query, keys, values, scale, mask))
            except Exception as err:
                row[f"flex_d{density}_error"] = f"{type(err).__name__}: {err}"[:300]

    if len(seq_lens) == 1:  # end to end at tau = 0.9 on structured inputs
        s = seq_lens[0]
        q_s, k_s, v_s = structured_qkv(s, HQ, HKV, DIM, seed=0, device=device, dtype=torch.bfloat16)
        kv_s = paged(k_s, v_s, [s], gen)
        q_s = q_s[context_lens[0] :]
        config = resolve_config({"tau": 0.9, "min_sparse_tokens": 0, **args.config})
        budget = config.for_layer(1)
        row["estimate_ms"] = bench(
            lambda: batch_block_mass(
                q_s, kv_s, batch, [True], config=config, c_h=HQ // HKV, scale=scale
            )
        )
        row["plan_ms"] = bench(
            lambda: kernels.plan_prefill(q_s, kv_s, batch, config, budget, scale=scale)
        )
        plan = kernels.plan_prefill(q_s, kv_s, batch, config, budget, scale=scale)
        row["e2e_density"] = plan.density()
        row["attend_ms"] = bench(
            lambda: kernels.sparse_attention(q_s, kv_s, batch, plan, scale, out=out)
        )
        row["e2e_ms"] = row["plan_ms"] + row["attend_ms"]
        if not HAVE_VLLM:
            print(json.dumps(row), flush=True)
            return row
        run_dense, dense_out = fa3(q_s, kv_s, batch, scale)
        run_dense()
        sparse_out = kernels.sparse_attention(q_s, kv_s, batch, plan, scale)
        full_plan = fixed_density_plan(batch, 1.0, 128, device)
        ours_dense = kernels.sparse_attention(q_s, kv_s, batch, full_plan, scale)
        row["e2e_rel_error_vs_fa3"] = relative_error(sparse_out, dense_out)
        row["density1_rel_error_vs_fa3"] = relative_error(ours_dense, dense_out)
    if HAVE_VLLM:
        row["fa3_tflops"] = causal_tflops(seq_lens, row["fa3_ms"], query_lens)
    row["ours_d1.0_tflops"] = causal_tflops(seq_lens, row["ours_d1.0_ms"], query_lens)
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    cols = (
        ["fa3_ms", "sdpa_flash_ms"]
        + [f"flex_d{d}_ms" for d in FLEX_DENSITIES]
        + [f"ours_d{d}_ms" for d in DENSITIES]
        + [f"{name}_d{d}_ms" for name in ("triton", "flash") for d in EXECUTOR_DENSITIES]
        + [
            "estimate_ms",
            "plan_ms",
            "e2e_density",
            "attend_ms",
            "e2e_ms",
            "e2e_rel_error_vs_fa3",
            "density1_rel_error_vs_fa3",
        ]
    )
    head = f"{'scenario':<22}" + "".join(f"{c.replace('_ms', ''):>14}" for c in cols)
    lines = [head]
    for r in rows:
        cells = "".join(
            f"{r[c]:>14.3f}" if isinstance(r.get(c), float) else f"{'-':>14}" for c in cols
        )
        lines.append(f"{r['scenario']:<22}{cells}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072]
    )
    parser.add_argument("--no-mixed", action="store_true", help="skip the chunked and batch cases")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--config",
        type=json.loads,
        default={},
        help="UniSparse options of the end-to-end columns, JSON (default: tau 0.9)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA GPU")
    torch._dynamo.config.recompile_limit = 64  # FlexAttention compiles per shape and mask
    gen = torch.Generator().manual_seed(0)
    rows = [scenario(f"one-shot {s // 1024}K", [s], [0], args, gen) for s in args.seq]
    if not args.no_mixed:
        rows.append(scenario("chunk 16K over 48K", [16384], [49152], args, gen))
        # vLLM's smaller prefill chunks: where FA3's per-call cost meets the Triton kernel
        rows.append(scenario("chunk 2K over 62K", [2048], [63488], args, gen))
        rows.append(scenario("chunk 8K over 56K", [8192], [57344], args, gen))
        rows.append(scenario("batch 4K+16K+32K", [4096, 16384, 32768], [0, 0, 0], args, gen))
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "gpu": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "triton": triton.__version__,
                    "rows": rows,
                },
                indent=1,
            )
        )
    print(table(rows))


if __name__ == "__main__":
    main()
