"""Shared builders for tests: random varlen batches, an independent dense reference, and
benchmark scripts run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from unisparse_vllm.core import ContiguousKV, PrefillBatch


def random_batch(
    query_lens: list[int],
    context_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[Tensor, ContiguousKV, PrefillBatch]:
    gen = torch.Generator().manual_seed(seed)
    batch = PrefillBatch.from_lens(query_lens, context_lens)
    total = sum(batch.seq_lens)
    # Scaled so softmax is peaked enough for selection to matter.
    query = (2 * torch.randn(batch.num_tokens, num_q_heads, head_dim, generator=gen)).to(dtype)
    keys = (2 * torch.randn(total, num_kv_heads, head_dim, generator=gen)).to(dtype)
    values = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    starts = [0]
    for s in batch.seq_lens[:-1]:
        starts.append(starts[-1] + s)
    return query, ContiguousKV(keys, values, tuple(starts)), batch


def sdpa_reference(query: Tensor, kv: ContiguousKV, batch: PrefillBatch, scale: float) -> Tensor:
    """Dense causal attention through torch SDPA, in float64: independent of ``core``."""
    out = torch.empty_like(query, dtype=torch.float64)
    for r, (c, n) in enumerate(zip(batch.context_lens, batch.query_lens, strict=True)):
        k, v = kv.keys_values(r, c + n)
        group = query.shape[1] // k.shape[1]
        q = query[batch.query_slice(r)].double().transpose(0, 1)
        k = k.double().repeat_interleave(group, 1).transpose(0, 1)
        v = v.double().repeat_interleave(group, 1).transpose(0, 1)
        mask = torch.arange(c + n)[None, :] <= torch.arange(c, c + n)[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out[batch.query_slice(r)] = o.transpose(0, 1)
    return out


BENCH = Path(__file__).parents[1] / "benchmarks"


def run_benchmark(
    script: str, argv: list[str], timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> argv...`` in a child process, output captured as text."""
    return subprocess.run(
        [sys.executable, str(BENCH / script), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
    )
