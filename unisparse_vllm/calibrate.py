"""Per-layer budgets from real activations: ``unisparse calibrate``.

Runs a Hugging Face model (CPU is enough for small models) over calibration text, captures
each layer's post-RoPE queries and keys, and for each layer picks the smallest ``tau`` whose
plan keeps at least a target share of the exact attention mass on average (its recall);
layers that miss the target even at the largest ``tau`` become dense layers. The target is
either that recall (``target_recall``) or a compute budget (``target_density``): the highest
recall every layer can be held to with the mean density over the layers within the budget.
Layers whose sparsity moves the answer more than their recall says (found with
``benchmarks/answer_shift.py``) can keep their own recall target (``layer_recall``).
The result is a profile YAML that ``--additional-config '{"unisparse": {"profile": "..."}}'``
loads.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from torch import Tensor

from .config import ConfigError, UniSparseConfig
from .core import ContiguousKV, PrefillBatch, exact_key_block_probs, plan_prefill
from .core.baselines import ESTIMATORS
from .core.metrics import mass_recall

# Fine steps near the top: on Qwen2.5-Coder-0.5B at 16K, the grid without 0.92-0.97 jumped
# from 0.95 to 0.98 and overshot (recall 0.963 for a 0.95 target, sparse-layer density
# 0.320); this grid meets the same target at 0.955 recall and density 0.284. 0.99: a layer's
# own recall target of 0.98 (``layer_recall``) needs it on Qwen's layer 10 (0.979 at 0.98),
# which would otherwise go dense.
DEFAULT_TAUS = (0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)


def measuring_device(name: str) -> str:
    """``--device`` of the measuring commands: ``auto`` is a GPU if there is one; asking for
    CUDA where there is none is a config error, not a torch traceback."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here")
    return name


def measuring_dtype(device: str) -> torch.dtype:
    """The model's dtype for measuring: bf16 on a GPU, as it is served (and fp32 SDPA with
    grouped heads falls back to the math kernel there: 56 GB of scores at 32K tokens for
    Qwen2.5-0.5B); fp32 on the CPU, whose bf16 matmuls are slow."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def capture_qkv(model: Any, ids: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per layer ``(query [n, Hq, d], keys [n, Hkv, d], values [n, Hkv, d])``, post-RoPE, fp32.

    Works for Hugging Face decoder models whose attention calls their module's
    ``apply_rotary_pos_emb`` (Llama, Qwen2, Qwen3, Mistral) and has a ``v_proj``.
    """
    module: Any = importlib.import_module(type(model).__module__)
    original = module.apply_rotary_pos_emb
    rotated: list[tuple[Tensor, Tensor]] = []
    values: list[Tensor] = []
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def recording_rope(q: Tensor, k: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        q_embed, k_embed = original(q, k, *args, **kwargs)
        rotated.append((q_embed[0].transpose(0, 1).float(), k_embed[0].transpose(0, 1).float()))
        return q_embed, k_embed

    def record_values(_module: Any, _inputs: Any, out: Tensor) -> None:
        values.append(out[0].float().view(out.shape[1], -1, head_dim))

    hooks = [
        layer.self_attn.v_proj.register_forward_hook(record_values) for layer in model.model.layers
    ]
    module.apply_rotary_pos_emb = recording_rope
    try:
        with torch.no_grad():
            # The decoder stack only: the LM head's fp32 logits would be n x vocab (20 GB for
            # Qwen2.5 at 32K tokens), and only the attention inputs are wanted.
            model.model(ids)
    finally:
        module.apply_rotary_pos_emb = original
        for hook in hooks:
            hook.remove()
    return [(q, k, v) for (q, k), v in zip(rotated, values, strict=True)]


@dataclass(frozen=True)
class LayerChoice:
    layer: int
    tau: float | None  # None: dense; recall and density are then the largest tau's
    recall: float
    density: float

    @property
    def served_density(self) -> float:
        return 1.0 if self.tau is None else self.density


def layer_curve(
    query: Tensor,
    keys: Tensor,
    layer: int,
    config: UniSparseConfig,
    taus: tuple[float, ...] = DEFAULT_TAUS,
) -> Iterator[LayerChoice]:
    """Each tau's mean recall (over queries and heads) and density, smallest tau first; lazy,
    so that a recall target stops at the first tau reaching it."""
    seq_len = query.shape[0]
    batch = PrefillBatch.from_lens([seq_len])
    kv = ContiguousKV(keys, keys, (0,))  # values play no part in recall
    scale = 1 / math.sqrt(query.shape[-1])
    probs = exact_key_block_probs(query, keys, 0, config.block_size, scale)
    estimator = ESTIMATORS[config.estimator]
    masses: list[Tensor] = []

    def estimate_once(*args: Any, **kwargs: Any) -> Tensor:
        """Block mass does not depend on tau: estimate once, select once per tau."""
        if not masses:
            masses.append(estimator(*args, **kwargs))
        return masses[0]

    for tau in sorted(taus):
        budget = config.for_layer(layer).model_copy(
            update={"tau": tau, "mode": "top_p", "dense": False}
        )
        plan = plan_prefill(query, kv, batch, config, budget, scale=scale, estimator=estimate_once)
        recall = float(mass_recall(probs, plan, 0, 0).mean())
        yield LayerChoice(layer, tau, recall, plan.density())


def choose_for_recall(curve: Iterable[LayerChoice], target_recall: float) -> LayerChoice:
    """The smallest tau reaching ``target_recall``; dense when none does."""
    last = None
    for point in curve:
        if point.recall >= target_recall:
            return point
        last = point
    if last is None:
        raise ValueError("a layer curve needs at least one tau")
    # A layer is made dense only when no tau reaches the target, never for its density: that
    # falls with length, so a short calibration prompt would overstate it.
    return replace(last, tau=None)


def choose_per_layer(
    curves: Iterable[Iterable[LayerChoice]],
    target_recall: float,
    layer_recall: Mapping[int, float],
) -> list[LayerChoice]:
    """``choose_for_recall`` on each layer's curve (curves in layer order), at the layer's
    own target where ``layer_recall`` gives one, else at ``target_recall``."""
    return [
        choose_for_recall(curve, layer_recall.get(layer, target_recall))
        for layer, curve in enumerate(curves)
    ]


def mean_density(choices: list[LayerChoice]) -> float:
    """What a profile costs: the mean over all layers of the share of causal blocks computed,
    a dense layer counting 1."""
    return sum(c.served_density for c in choices) / len(choices)


def choose_for_density(
    curves: list[list[LayerChoice]],
    target_density: float,
    layer_recall: Mapping[int, float] | None = None,
) -> list[LayerChoice]:
    """Every layer held to the highest common recall target (as ``choose_for_recall``) whose
    mean density over the layers, a dense layer counting 1, is at most ``target_density``;
    a layer in ``layer_recall`` keeps its own target, and its density counts in the mean."""
    own = layer_recall or {}
    common = {
        point.recall for layer, curve in enumerate(curves) if layer not in own for point in curve
    }
    # With every layer's target given there is nothing to solve: one pass checks the budget.
    for target in sorted(common, reverse=True) or [0.0]:
        choices = choose_per_layer(curves, target, own)
        density = mean_density(choices)
        if density <= target_density:
            return choices
    fixed = ", the layer_recall layers at their own targets," if own else ""
    raise ConfigError(
        f"target_density {target_density}: out of reach, the smallest tau tried{fixed} gives "
        f"mean density {density:.3f} (try smaller taus)"
    )


def calibrated_profile(choices: list[LayerChoice], config: UniSparseConfig) -> dict[str, Any]:
    """Profile settings: the estimator, geometry and forced blocks measured with (recall
    depends on them, so a later change of defaults must not change the profile), the dense
    layers, and one ``tau`` override per sparse layer."""
    dense = sorted(c.layer for c in choices if c.tau is None)
    overrides = [
        {"layers": [c.layer], "tau": c.tau}
        for c in sorted(choices, key=lambda c: c.layer)
        if c.tau is not None
    ]
    return {
        "estimator": config.estimator,
        "block_size": config.block_size,
        "c_q": config.c_q,
        "c_k": config.c_k,
        "c_h": config.c_h,
        "max_mix": config.max_mix,
        "sink_blocks": config.sink_blocks,
        "local_blocks": config.local_blocks,
        "dense_layers": dense,
        "layer_overrides": overrides,
    }


def calibrate(
    model_path: str,
    texts: list[str],
    *,
    target_recall: float | None = None,
    target_density: float | None = None,
    tokens: int,
    config: UniSparseConfig,
    taus: tuple[float, ...] = DEFAULT_TAUS,
    device: str = "cpu",
    layer_recall: Mapping[int, float] | None = None,
) -> tuple[dict[str, Any], list[LayerChoice], int]:
    """``(profile settings, per-layer choices, calibration tokens used)``; the model and
    every measurement run on ``device``. One target: ``target_recall`` or ``target_density``;
    ``layer_recall`` (layer -> recall) overrides it for some layers."""
    if (target_recall is None) == (target_density is None):
        raise ValueError("calibrate needs one of target_recall and target_density")
    if not taus or not all(0 < tau <= 1 for tau in taus):
        raise ConfigError(f"taus: each must be in (0, 1], got {list(taus)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=measuring_dtype(device))
    model = model.to(device).eval()
    own = dict(layer_recall or {})
    num_layers = model.config.num_hidden_layers
    past = sorted(layer for layer in own if layer >= num_layers)
    if past:  # before the forward pass, the calibration's cost
        raise ConfigError(f"layer_recall: layers {past} are past the model's {num_layers} layers")
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[:, :tokens].to(device)
    if ids.shape[1] < 2 * config.block_size:
        raise ValueError(
            f"calibration text gives {ids.shape[1]} tokens; need >= {2 * config.block_size}"
        )
    # Measure every layer sparsely, whatever the prompt length and the profile's dense layers.
    measured = config.model_copy(update={"min_sparse_tokens": 0, "dense_layers": []})
    curves = [
        layer_curve(q, k, layer, measured, taus)
        for layer, (q, k, _v) in enumerate(capture_qkv(model, ids))
    ]
    if target_recall is not None:
        choices = choose_per_layer(curves, target_recall, own)
    else:
        choices = choose_for_density(
            [list(curve) for curve in curves], cast(float, target_density), own
        )
    return calibrated_profile(choices, config), choices, int(ids.shape[1])


# What a calibration's recall depends on besides the taus: a length tier may not change it.
MEASURED_WITH = (
    "estimator",
    "block_size",
    "c_q",
    "c_k",
    "c_h",
    "max_mix",
    "sink_blocks",
    "local_blocks",
)


def check_length_tier(
    base_config: UniSparseConfig, calibrated: UniSparseConfig, min_prompt_tokens: int
) -> None:
    """Whether ``calibrated``'s budgets can be a length tier of ``base_config`` from
    ``min_prompt_tokens`` on (call before calibrating: the error comes before the cost)."""
    for name in MEASURED_WITH:
        ours, theirs = getattr(base_config, name), getattr(calibrated, name)
        if ours != theirs:
            raise ConfigError(
                f"--tier-of: the base profile has {name} = {ours!r}, this calibration "
                f"{theirs!r}; a length tier changes budgets, not what they were measured with"
            )
    starts = [t.min_prompt_tokens for t in base_config.length_tiers]
    if starts and min_prompt_tokens <= starts[-1]:
        raise ConfigError(
            f"--min-prompt-tokens {min_prompt_tokens}: must exceed the base profile's last "
            f"length tier ({starts[-1]})"
        )


def with_length_tier(
    base: dict[str, Any],
    base_config: UniSparseConfig,
    calibrated: UniSparseConfig,
    min_prompt_tokens: int,
    num_layers: int,
) -> dict[str, Any]:
    """``base`` (a profile's settings, resolving to ``base_config``) plus a length tier from
    ``min_prompt_tokens`` on that gives every layer ``calibrated``'s budget: one override per
    layer, with the fields that differ there and always the layer's ``tau`` (``dense: true``
    for a dense one). A tier inherits what it does not say from the base, so a tau left out
    because it matched would follow a later edit of the base's taus (it did once, by hand)."""
    check_length_tier(base_config, calibrated, min_prompt_tokens)
    overrides = []
    for layer in range(num_layers):
        before = base_config.for_layer(layer, min_prompt_tokens)
        wanted = calibrated.for_layer(layer)
        changes = {
            name: value
            for name, value in wanted.model_dump().items()
            if value != getattr(before, name)
        }
        changes.update({"dense": True} if wanted.dense else {"tau": wanted.tau})
        overrides.append({"layers": [layer], **changes})
    tier = {"min_prompt_tokens": min_prompt_tokens, "layer_overrides": overrides}
    return {**base, "length_tiers": [*base.get("length_tiers", []), tier]}


def write_profile(
    settings: dict[str, Any],
    path: Path,
    choices: list[LayerChoice],
    header: str,
    preamble: str = "",
) -> None:
    """The profile YAML, with one comment line per layer saying what was measured, after
    ``preamble`` (comment lines: a base profile's, under ``--tier-of``)."""
    lines = [f"# {header}"]
    lines += [
        f"#   layer {c.layer}: {'dense' if c.tau is None else f'tau {c.tau}'}"
        f" (mean recall {c.recall:.3f}, density {c.density:.3f})"
        for c in choices
    ]
    text = "\n".join(lines) + "\n" + yaml.safe_dump(settings, sort_keys=False)
    path.write_text(preamble + text)
