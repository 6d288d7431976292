"""Per-layer counters of the sparse path, so operators (and tests) can see it ran.

Counted per process (each engine worker): prefill tokens that went through block
selection vs. densely, and the selected density. The selected blocks are added up on the
GPU and copied to the host without waiting (pinned memory, an event): a step's count
reaches the counters at a later step, once its copy is done (reading it at once would make
the host wait for the GPU at every layer). Logged at INFO at most every ``LOG_INTERVAL_S``
(the first at once). With ``UNISPARSE_STATS_PATH`` set, each worker also writes its counters
as JSON to ``<path>.<pid>.json`` after every sparse step (for tests and debugging; it costs
a host wait and a small file write per layer and step).

The same counters are Prometheus counters (``PROMETHEUS_METRICS``). The engine runs in
its own process, so vLLM's ``/metrics`` shows them when the server aggregates processes:
with ``PROMETHEUS_MULTIPROC_DIR`` set (vLLM sets it itself for ``--api-server-count`` > 1)
or with the engine in the server's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger("vllm.unisparse")  # a child of vLLM's configured logger
LOG_INTERVAL_S = 30.0
# name -> help; each is a counter labelled by layer (and ``path`` for the tokens).
PROMETHEUS_METRICS = {
    "unisparse:prefill_tokens": "Prefill tokens per attention layer, by path (sparse/dense).",
    "unisparse:selected_blocks": "Key blocks the block plans selected (sparse path).",
    "unisparse:causal_blocks": "Causal key blocks of the planned rows (selected <= causal).",
    "unisparse:sparse_errors": "Steps whose sparse path raised and that ran densely instead.",
    "unisparse:prompt_length_unknown_tokens": "Prefill tokens of steps whose prompt lengths "
    "the model runner did not give: each chunk's end stood for its prompt's end.",
}


class _Prometheus:
    """The counters (one set per process: prometheus_client registers names globally)."""

    def __init__(self) -> None:
        from prometheus_client import Counter

        tokens, selected, causal, errors, unknown = PROMETHEUS_METRICS
        self.tokens = Counter(tokens, PROMETHEUS_METRICS[tokens], ["layer", "path"])
        self.selected = Counter(selected, PROMETHEUS_METRICS[selected], ["layer"])
        self.causal = Counter(causal, PROMETHEUS_METRICS[causal], ["layer"])
        self.errors = Counter(errors, PROMETHEUS_METRICS[errors], ["layer"])
        self.unknown = Counter(unknown, PROMETHEUS_METRICS[unknown], ["layer"])

    def record(
        self, layer: str, *, sparse_tokens: int, dense_tokens: int, causal: int, unknown: int
    ) -> None:
        self.tokens.labels(layer, "sparse").inc(sparse_tokens)
        self.tokens.labels(layer, "dense").inc(dense_tokens)
        self.causal.labels(layer).inc(causal)
        self.unknown.labels(layer).inc(unknown)


@functools.cache
def prometheus() -> _Prometheus:
    """Made on first use: only engine processes that run prefills export the counters."""
    return _Prometheus()


@dataclass
class LayerCounters:
    sparse_prefill_tokens: int = 0
    dense_prefill_tokens: int = 0
    selected_blocks: int = 0
    causal_blocks: int = 0
    sparse_errors: int = 0
    # Prefill tokens routed by each chunk's end: the runner did not give prompt lengths.
    prompt_length_unknown_tokens: int = 0

    @property
    def mean_density(self) -> float:
        return self.selected_blocks / self.causal_blocks if self.causal_blocks else 1.0


@dataclass
class _Readback:
    """Selected-block counts on their way to the host: ``host`` is complete once ``event``
    is (a non-blocking copy into pinned memory)."""

    layers: list[str]
    host: Tensor
    event: Any  # torch.cuda.Event


class SparseStats:
    def __init__(self) -> None:
        self._layers: dict[str, LayerCounters] = {}
        self._on_device: dict[str, Tensor] = {}  # selected blocks not copied yet, per layer
        self._readback: _Readback | None = None
        self._last_log = float("-inf")  # the first sparse step is logged at once

    @property
    def layers(self) -> dict[str, LayerCounters]:
        """The counters per layer, every selected block included (a host wait if some are
        still on the GPU)."""
        self._collect(wait=True)
        return self._layers

    def _add_selected(self, layer: str, count: int) -> None:
        self._layers[layer].selected_blocks += count
        prometheus().selected.labels(layer).inc(count)

    def _collect(self, *, wait: bool) -> None:
        """Add the counts whose copy is done (all, with ``wait``), and start copying the
        ones added up on the GPU since, if no copy is under way."""
        readback = self._readback
        if readback is not None and (wait or readback.event.query()):
            readback.event.synchronize()
            for layer, count in zip(readback.layers, readback.host.tolist(), strict=True):
                self._add_selected(layer, count)
            self._readback = None
        if not self._on_device:
            return
        if wait or not next(iter(self._on_device.values())).is_cuda:
            for layer, selected in self._on_device.items():
                self._add_selected(layer, int(selected))
        elif self._readback is None:
            layers = list(self._on_device)
            counts = torch.stack([self._on_device[layer] for layer in layers])
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._readback = _Readback(layers, host, event)
        else:
            return  # one copy at a time: these wait on the GPU for the next one
        self._on_device.clear()

    def record(
        self,
        layer: str,
        *,
        sparse_tokens: int,
        dense_tokens: int,
        selected: int | Tensor,
        causal: int,
        prompt_length_unknown_tokens: int = 0,
    ) -> None:
        """One sparse-path step of ``layer``; ``selected`` may be a tensor (a 0-d count),
        which on a GPU is added up there and reaches the counters once copied."""
        counters = self._layers.setdefault(layer, LayerCounters())
        counters.sparse_prefill_tokens += sparse_tokens
        counters.dense_prefill_tokens += dense_tokens
        counters.causal_blocks += causal
        counters.prompt_length_unknown_tokens += prompt_length_unknown_tokens
        if isinstance(selected, Tensor):
            waiting = self._on_device.get(layer)
            self._on_device[layer] = selected if waiting is None else waiting + selected
            self._collect(wait=False)
        else:
            self._add_selected(layer, selected)
        prometheus().record(
            layer,
            sparse_tokens=sparse_tokens,
            dense_tokens=dense_tokens,
            causal=causal,
            unknown=prompt_length_unknown_tokens,
        )
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_S:
            self._last_log = now
            logger.info("UniSparse: %s", self.summary())
        path = os.environ.get("UNISPARSE_STATS_PATH")
        if path and sparse_tokens:
            target = Path(f"{path}.{os.getpid()}.json")
            target.write_text(json.dumps(self.snapshot()))

    def record_error(self, layer: str) -> None:
        """A step of ``layer`` whose sparse path raised (it ran densely; ``record`` follows)."""
        self._layers.setdefault(layer, LayerCounters()).sparse_errors += 1
        prometheus().errors.labels(layer).inc()

    def reset(self) -> None:
        """Start counting afresh (benchmarks measure one phase at a time)."""
        self._collect(wait=True)  # a copy under way must not land in the fresh counters
        self._layers.clear()

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {
            name: {**asdict(c), "mean_density": c.mean_density} for name, c in self.layers.items()
        }

    def summary(self) -> str:
        sparse = sum(c.sparse_prefill_tokens for c in self.layers.values())
        dense = sum(c.dense_prefill_tokens for c in self.layers.values())
        selected = sum(c.selected_blocks for c in self.layers.values())
        causal = sum(c.causal_blocks for c in self.layers.values())
        unknown = sum(c.prompt_length_unknown_tokens for c in self.layers.values())
        density = selected / causal if causal else 1.0
        return (
            f"{len(self.layers)} layers, prefill tokens sparse={sparse} dense={dense} "
            f"prompt length unknown={unknown} (summed over layers), "
            f"mean selected density {density:.3f}"
        )


STATS = SparseStats()
