"""Synthetic long-context attention inputs with the structure real prompts show.

Used by ``unisparse demo``, tests and benchmarks when no model is at hand. Three effects,
each a known shape of real attention:
- topic segments (64-512 tokens): queries attend to earlier keys of the same topic, far
  back as well as near (retrieval-like, block sparse);
- an attention sink: the first tokens' keys share a direction every query has a little of;
- recency: a slowly rotating 2-D component (RoPE's low frequencies) in queries and keys.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def structured_qkv(
    seq_len: int,
    num_q_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    *,
    num_topics: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """``(query [S, Hq, d], keys [S, Hkv, d], values [S, Hkv, d])`` of one sequence."""
    if head_dim < 8:
        raise ValueError(f"head_dim must be >= 8, got {head_dim}")
    gen = torch.Generator(device=device).manual_seed(seed)
    group = num_q_heads // num_kv_heads

    lengths: list[int] = []
    while sum(lengths) < seq_len:
        lengths.append(int(torch.randint(64, 513, (1,), generator=gen, device=device)))
    topic_of_segment = torch.randint(num_topics, (len(lengths),), generator=gen, device=device)
    topic = torch.repeat_interleave(topic_of_segment, torch.tensor(lengths, device=device))
    topic = topic[:seq_len]

    # Topic directions per KV head, orthogonal to the two recency dims and the sink dim.
    topics = torch.randn(num_kv_heads, num_topics, head_dim, generator=gen, device=device)
    topics[..., :3] = 0
    topics = topics / topics.norm(dim=-1, keepdim=True)
    strength = math.sqrt(7.0 * math.sqrt(head_dim))  # same-topic logit ~ 7

    pos = torch.arange(seq_len, dtype=torch.float64, device=device)
    angle = pos * (2 * math.pi / 4096)  # a low RoPE frequency: one turn per 4K tokens
    recency = torch.stack([angle.cos(), angle.sin()], dim=-1).float() * math.sqrt(
        4.0 * math.sqrt(head_dim)
    )

    keys = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen, device=device)
    keys += strength * topics[:, topic].transpose(0, 1)
    keys[..., 1:3] += recency[:, None]
    keys[:4, :, 0] += 3.0 * strength  # the sink

    query = torch.randn(seq_len, num_q_heads, head_dim, generator=gen, device=device)
    query += strength * topics[:, topic].transpose(0, 1).repeat_interleave(group, dim=1)
    query[..., 1:3] += recency[:, None]
    query[..., 0] += 0.2 * strength

    values = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen, device=device)
    return query.to(dtype), keys.to(dtype), values.to(dtype)
