"""What a prefill step looks like: a varlen batch of (cached context, new query chunk) requests,
and the two ways its keys/values can be stored (contiguous, or vLLM's paged cache)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor


@dataclass(frozen=True)
class PrefillBatch:
    """Request ``r`` has ``context_lens[r]`` tokens already cached (earlier chunks, prefix-cache
    hits) and a chunk of ``query_lens[r]`` new tokens at absolute positions
    ``context_lens[r] .. context_lens[r] + query_lens[r] - 1``. Queries of all requests are
    packed along the token axis in request order (vLLM's ``query_start_loc``)."""

    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.query_lens) != len(self.context_lens):
            raise ValueError(
                f"query_lens has {len(self.query_lens)} entries, "
                f"context_lens {len(self.context_lens)}"
            )
        if any(n <= 0 for n in self.query_lens):
            raise ValueError(f"query_lens must be > 0, got {self.query_lens}")
        if any(c < 0 for c in self.context_lens):
            raise ValueError(f"context_lens must be >= 0, got {self.context_lens}")

    @classmethod
    def from_lens(
        cls, query_lens: list[int], context_lens: list[int] | None = None
    ) -> PrefillBatch:
        context = context_lens if context_lens is not None else [0] * len(query_lens)
        return cls(tuple(int(n) for n in query_lens), tuple(int(c) for c in context))

    @property
    def num_requests(self) -> int:
        return len(self.query_lens)

    @property
    def seq_lens(self) -> tuple[int, ...]:
        return tuple(c + n for c, n in zip(self.context_lens, self.query_lens, strict=True))

    @property
    def query_start(self) -> tuple[int, ...]:
        """Offsets of each request's chunk in the packed query, plus the total at the end."""
        return (0, *accumulate(self.query_lens))

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    def query_slice(self, request: int) -> slice:
        return slice(self.query_start[request], self.query_start[request + 1])


def int32_tables(parts: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, ...]:
    """Integer lists as int32 tensors on ``device`` with one host-to-device copy. Each starts
    16-byte aligned in the shared buffer: Triton compiles a kernel variant per pointer
    alignment, so unaligned views would compile new variants as the step's sizes vary."""
    padded = [-(-len(part) // 4) * 4 for part in parts]  # 4 int32 = 16 bytes
    table = torch.zeros(sum(padded), dtype=torch.int32)
    start = 0
    for part, size in zip(parts, padded, strict=True):
        table[start : start + len(part)] = torch.tensor(part, dtype=torch.int32)
        start += size
    views = table.to(device, non_blocking=True).split(padded)
    return tuple(view[: len(part)] for view, part in zip(views, parts, strict=True))


@functools.lru_cache(maxsize=16)
def device_offsets(batch: PrefillBatch, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(query_start, context_lens)`` as int32 tensors on ``device``, copied once per step
    rather than once per layer (callers only read them)."""
    query_start, context_lens = int32_tables([batch.query_start, batch.context_lens], device)
    return query_start, context_lens


def query_block_range(context_len: int, query_len: int, block_size: int) -> range:
    """Absolute indices of the query blocks a chunk touches (first and last may be partial)."""
    return range(context_len // block_size, (context_len + query_len - 1) // block_size + 1)


def working_dtype(tensor: Tensor) -> torch.dtype:
    """What the reference computes in: float64 for float64 inputs (the tests against exact
    references), float32 for everything else (bf16 / fp16 / fp32 activations)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def num_key_blocks(seq_len: int, block_size: int) -> int:
    return math.ceil(seq_len / block_size)


@dataclass(frozen=True)
class ContiguousKV:
    """Keys/values ``[sum(seq_lens), Hkv, d]``; request ``r`` starts at ``seq_start[r]``."""

    keys: Tensor
    values: Tensor
    seq_start: tuple[int, ...]

    @property
    def num_kv_heads(self) -> int:
        return int(self.keys.shape[1])

    def keys_values(self, request: int, length: int) -> tuple[Tensor, Tensor]:
        start = self.seq_start[request]
        return self.keys[start : start + length], self.values[start : start + length]

    def request_keys(self, request: int, length: int) -> Tensor:
        return self.keys_values(request, length)[0]

    def to_paged(
        self, batch: PrefillBatch, page_size: int, generator: torch.Generator | None = None
    ) -> PagedKV:
        """The same data in a paged cache with physical pages in random order (as vLLM's are)."""
        pages_per_request = [math.ceil(s / page_size) for s in batch.seq_lens]
        total = sum(pages_per_request)
        order = torch.randperm(total, generator=generator)
        heads, dim = self.keys.shape[1:]
        key_cache = self.keys.new_zeros(total, page_size, heads, dim)
        value_cache = torch.zeros_like(key_cache)
        width = max(pages_per_request)
        block_table = torch.zeros(batch.num_requests, width, dtype=torch.int32)
        used = 0
        for r, (pages, seq_len) in enumerate(zip(pages_per_request, batch.seq_lens, strict=True)):
            physical = order[used : used + pages]
            used += pages
            block_table[r, :pages] = physical.to(torch.int32)
            k, v = self.keys_values(r, seq_len)
            pad = pages * page_size - seq_len
            key_cache[physical] = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(
                pages, page_size, heads, dim
            )
            value_cache[physical] = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).view(
                pages, page_size, heads, dim
            )
        return PagedKV(key_cache, value_cache, block_table.to(self.keys.device))


@dataclass(frozen=True)
class PagedKV:
    """vLLM's paged layout: ``key_cache``/``value_cache`` ``[num_pages, page_size, Hkv, d]`` and
    ``block_table[r, p]`` = physical page of request ``r``'s logical page ``p``."""

    key_cache: Tensor
    value_cache: Tensor
    block_table: Tensor

    @property
    def num_kv_heads(self) -> int:
        return int(self.key_cache.shape[2])

    @property
    def page_size(self) -> int:
        return int(self.key_cache.shape[1])

    def keys_values(self, request: int, length: int) -> tuple[Tensor, Tensor]:
        return self._gather(self.key_cache, request, length), self._gather(
            self.value_cache, request, length
        )

    def request_keys(self, request: int, length: int) -> Tensor:
        """Keys only (estimators never read values: half the gather)."""
        return self._gather(self.key_cache, request, length)

    def _gather(self, cache: Tensor, request: int, length: int) -> Tensor:
        pages = self.block_table[request, : math.ceil(length / self.page_size)].long()
        return cache[pages].reshape(-1, *cache.shape[2:])[:length]


KVSource = ContiguousKV | PagedKV
