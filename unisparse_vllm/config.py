"""The sparsity budget: pydantic models, built-in per-model profiles and their resolution.

Precedence, lowest first: the generic default profile < the model family's profile <
a user profile file < inline values. Inline values are what vLLM passes through
``--additional-config '{"unisparse": {...}}'``; a ``"profile": "path.yaml"`` key among
them names the user file.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROFILE_KEY = "profile"


class ConfigError(ValueError):
    """A UniSparse configuration that cannot be used; the message names field and value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerBudget(_Strict):
    """How one layer selects key blocks: the fields a per-layer override may change."""

    mode: Literal["top_p", "topk"] = Field(
        "top_p", description="top_p: smallest set reaching mass tau; topk: fixed density."
    )
    tau: float = Field(0.9, gt=0.0, le=1.0, description="Cumulative block mass to reach.")
    density: float = Field(
        0.1, gt=0.0, le=1.0, description="topk mode: fraction of the causal blocks per row."
    )
    sink_blocks: int = Field(1, ge=0, description="First key blocks always selected.")
    local_blocks: int = Field(
        2, ge=1, description="Key blocks up to and including the diagonal always selected."
    )
    min_blocks: int = Field(1, ge=1, description="Fewest key blocks per row.")
    max_blocks: int | None = Field(
        None, ge=1, description="Most key blocks per row (None: no bound)."
    )
    dense: bool = Field(False, description="Run this layer densely.")

    @model_validator(mode="after")
    def _bounds_are_consistent(self) -> LayerBudget:
        if self.max_blocks is not None:
            forced = self.sink_blocks + self.local_blocks
            if self.max_blocks < max(self.min_blocks, forced):
                raise ValueError(
                    f"max_blocks={self.max_blocks} must be >= min_blocks={self.min_blocks} "
                    f"and >= sink_blocks + local_blocks = {forced}"
                )
        return self


def parse_layer_spec(spec: int | str) -> tuple[int, int]:
    """``3`` or ``"3"`` -> (3, 3); ``"2-5"`` -> (2, 5), inclusive."""
    if isinstance(spec, int):
        first = last = spec
    else:
        parts = spec.split("-")
        try:
            first, last = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (-1, -1)
        except ValueError:
            first = last = -1
        if first < 0 or last < first:
            raise ValueError(f"layer spec {spec!r} is not an index or a range 'a-b' with a <= b")
    if first < 0:
        raise ValueError(f"layer index {first} must be >= 0")
    return first, last


class LayerOverride(_Strict):
    """Budget fields for some layers, given by index (``3``) or inclusive range (``"2-5"``)."""

    layers: list[int | str] = Field(min_length=1)
    mode: Literal["top_p", "topk"] | None = None
    tau: float | None = Field(None, gt=0.0, le=1.0)
    density: float | None = Field(None, gt=0.0, le=1.0)
    sink_blocks: int | None = Field(None, ge=0)
    local_blocks: int | None = Field(None, ge=1)
    min_blocks: int | None = Field(None, ge=1)
    max_blocks: int | None = Field(None, ge=1)
    dense: bool | None = None

    @field_validator("layers")
    @classmethod
    def _layers_parse(cls, layers: list[int | str]) -> list[int | str]:
        for spec in layers:
            parse_layer_spec(spec)
        return layers

    def covers(self, layer: int) -> bool:
        return any(a <= layer <= b for a, b in map(parse_layer_spec, self.layers))

    def changes(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"layers"}).items() if v is not None}


class LengthTier(_Strict):
    """Budget changes for prompts of at least ``min_prompt_tokens`` tokens. At one tau a
    longer prompt selects a smaller share of its blocks, and what a share costs in accuracy
    differs by length too (RULER on Qwen 0.5B: the same taus keep 100.6% of dense at 32K and
    97.9% at 16K), so long prompts may get their own operating point."""

    min_prompt_tokens: int = Field(ge=1)
    layer_overrides: list[LayerOverride] = Field(min_length=1)


class UniSparseConfig(LayerBudget):
    """The whole sparsity budget of a model (defaults of ALGORITHM.md)."""

    block_size: Literal[64, 128] = Field(128, description="Query/key block size in tokens.")
    c_q: int = Field(4, ge=1, description="Queries pooled into one composite query.")
    c_k: int = Field(16, ge=1, description="Keys pooled into one composite key.")
    c_h: int | None = Field(
        None, ge=1, description="Query heads pooled per selection (None: the whole GQA group)."
    )
    min_sparse_tokens: int = Field(
        8192,
        ge=0,
        description="Prompts shorter than this stay dense; every chunk of a longer prompt is "
        "sparse (where the prompt's length is unknown, a chunk's context + length counts).",
    )
    dense_layers: list[int] = Field(
        default_factory=list,
        description="Layers that always run densely, by index (3) or inclusive range ('0-3').",
    )
    dense_tail_blocks: int = Field(
        1, ge=0, description="Last query blocks of a prompt that get full attention."
    )
    estimator: Literal["unisparse", "xattention", "last_block"] = Field(
        "unisparse",
        description="Block scores: UniSparse composite tokens, or a peer's rule for comparison "
        "(XAttention-style antidiagonals, FlexPrefill-style last query block).",
    )
    max_mix: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Weight of the peak term in the block mass: the largest composite-pair "
        "probability per block pair, normalised per row (ALGORITHM.md section 7 guard; "
        "UniSparse estimator only).",
    )
    dense_above_density: Annotated[float, Field(gt=0.0, le=1.0)] | Literal["auto"] | None = Field(
        None,
        description="A step whose selected density exceeds this runs dense (a dense kernel "
        "is faster there); auto: where the attention that runs stops being faster than dense "
        "(measured: 0.85 with FA3, 0.45 with the Triton kernel); null (default): never. Any "
        "check makes the host wait for the GPU at every sparse layer, to read the density.",
    )
    on_error: Literal["fallback", "raise"] = Field(
        "fallback",
        description="An exception in the sparse path of a step: run the step densely and log "
        "it (counted in unisparse:sparse_errors_total), or raise (tests, debugging).",
    )
    layer_overrides: list[LayerOverride] = Field(
        default_factory=list, description="Budget changes for some layers, later entries win."
    )
    length_tiers: list[LengthTier] = Field(
        default_factory=list,
        description="Budget changes for prompts of at least min_prompt_tokens, applied after "
        "layer_overrides; every tier a prompt reaches applies, in order (min_prompt_tokens "
        "ascending). A prompt whose length the backend does not know counts its chunk's end.",
    )

    @field_validator("c_q", "c_k")
    @classmethod
    def _divides_block(cls, value: int, info: Any) -> int:
        block_size = info.data.get("block_size", 128)
        if block_size % value:
            raise ValueError(f"must divide block_size={block_size}")
        return value

    @field_validator("dense_layers", mode="before")
    @classmethod
    def _expand_layer_ranges(cls, layers: Any) -> Any:
        # Ranges as in layer_overrides; left to the int check otherwise ('0-3' would parse
        # as the integer -3 there).
        if not isinstance(layers, list):
            return layers
        expanded: list[Any] = []
        for spec in layers:
            if isinstance(spec, str):
                first, last = parse_layer_spec(spec)
                expanded.extend(range(first, last + 1))
            else:
                expanded.append(spec)
        return expanded

    @field_validator("dense_layers")
    @classmethod
    def _non_negative_layers(cls, layers: list[int]) -> list[int]:
        bad = [i for i in layers if i < 0]
        if bad:
            raise ValueError(f"layer indices must be >= 0, got {bad}")
        return layers

    @field_validator("length_tiers")
    @classmethod
    def _tiers_ascend(cls, tiers: list[LengthTier]) -> list[LengthTier]:
        starts = [t.min_prompt_tokens for t in tiers]
        if starts != sorted(set(starts)):
            raise ValueError(
                f"min_prompt_tokens must increase from one tier to the next, got {starts}"
            )
        return tiers

    def tier_of(self, prompt_tokens: int) -> int:
        """How many length tiers a prompt of ``prompt_tokens`` reaches (0: none)."""
        return sum(t.min_prompt_tokens <= prompt_tokens for t in self.length_tiers)

    def for_layer(self, layer: int, prompt_tokens: int = 0) -> LayerBudget:
        """The budget of one layer for prompts of ``prompt_tokens``, overrides applied in
        order, then those of the length tiers the prompt reaches (resolve once per layer and
        tier, not per step: ``tier_budgets``)."""
        values = {name: getattr(self, name) for name in LayerBudget.model_fields}
        if layer in self.dense_layers:
            values["dense"] = True
        tiers = self.length_tiers[: self.tier_of(prompt_tokens)]
        overrides = [*self.layer_overrides, *(o for t in tiers for o in t.layer_overrides)]
        for override in overrides:
            if override.covers(layer):
                values.update(override.changes())
        try:
            return LayerBudget.model_validate(values)
        except ValidationError as err:
            source = f"layer_overrides (layer {layer})"
            if tiers:
                source += f" and length_tiers (prompts of >= {tiers[-1].min_prompt_tokens} tokens)"
            raise _config_error(err, source) from None

    def tier_budgets(self, layer: int) -> tuple[LayerBudget, ...]:
        """One layer's budget per length tier: index ``tier_of(prompt tokens)``."""
        starts = [0, *(t.min_prompt_tokens for t in self.length_tiers)]
        return tuple(self.for_layer(layer, start) for start in starts)

    def heads_per_selection(self, num_q_heads: int, num_kv_heads: int) -> int:
        """Resolve ``c_h`` for a model's head layout; raises if it does not divide the group."""
        if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
            raise ConfigError(
                f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}"
            )
        group = num_q_heads // num_kv_heads
        c_h = group if self.c_h is None else self.c_h
        if group % c_h:
            raise ConfigError(
                f"unisparse.c_h = {c_h}: must divide the GQA group size {group} "
                f"({num_q_heads} query heads / {num_kv_heads} KV heads)"
            )
        return c_h


def _config_error(err: ValidationError, source: str) -> ConfigError:
    lines = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(sorted([*UniSparseConfig.model_fields, PROFILE_KEY]))
            lines.append(f"unknown field {field!r} (allowed: {allowed})")
        else:
            lines.append(f"{field} = {item.get('input')!r}: {item['msg']}")
    return ConfigError(f"invalid UniSparse config from {source}: " + "; ".join(lines))


# ---- profiles ---------------------------------------------------------------------------


class ProfileMatch(_Strict):
    model_types: list[str] = Field(default_factory=list)
    architectures: list[str] = Field(default_factory=list)
    name_patterns: list[str] = Field(default_factory=list)

    def matches(
        self, model_type: str | None, architectures: Sequence[str], name: str | None
    ) -> bool:
        if model_type and model_type in self.model_types:
            return True
        if set(architectures) & set(self.architectures):
            return True
        lowered = (name or "").lower()
        return bool(lowered) and any(fnmatch.fnmatch(lowered, p) for p in self.name_patterns)


class Profile(_Strict):
    name: str
    description: str = ""
    match: ProfileMatch = Field(default_factory=ProfileMatch)
    settings: dict[str, Any] = Field(default_factory=dict)


def calibrated_profiles() -> dict[str, Path]:
    """Shipped model-specific profiles (``unisparse calibrate`` output), by name."""
    folder = Path(str(resources.files("unisparse_vllm"))) / "profiles" / "calibrated"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def profile_file(path: str | Path) -> Path:
    """A profile file, or a shipped calibrated profile's name, as the file it names."""
    file = Path(path)
    if not file.is_file() and str(path) in calibrated_profiles():
        file = calibrated_profiles()[str(path)]
    if not file.is_file():
        shipped = ", ".join(calibrated_profiles()) or "none"
        raise ConfigError(
            f"UniSparse profile file {str(file)!r} does not exist "
            f"(nor is it a shipped calibrated profile: {shipped})"
        )
    return file


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file holding one mapping, or a shipped calibrated profile's name;
    errors name the file."""
    file = profile_file(path)
    text = file.read_text()
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"UniSparse profile file {str(file)!r} does not parse: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"UniSparse profile file {str(file)!r} must hold a mapping, got {type(data).__name__}"
        )
    return data


@cache
def builtin_profiles() -> tuple[Profile, ...]:
    """The profiles shipped in ``unisparse_vllm/profiles``; ``default`` first."""
    folder = resources.files("unisparse_vllm") / "profiles"
    profiles = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            profile = Profile.model_validate(yaml.safe_load(entry.read_text()))
            profiles.append(profile)
    profiles.sort(key=lambda p: p.name != "default")
    return tuple(profiles)


def family_profile(
    model_type: str | None = None,
    architectures: Sequence[str] = (),
    model_name: str | None = None,
) -> Profile | None:
    """The first built-in family profile that matches the model, if any."""
    for profile in builtin_profiles()[1:]:
        if profile.match.matches(model_type, architectures, model_name):
            return profile
    return None


def resolve_config(
    inline: Mapping[str, Any] | None = None,
    *,
    file: str | Path | None = None,
    model_type: str | None = None,
    architectures: Sequence[str] = (),
    model_name: str | None = None,
) -> UniSparseConfig:
    """Merge default < family profile < user file < inline values and validate once."""
    inline = dict(inline or {})
    layers: list[tuple[str, Mapping[str, Any]]] = [
        ("the default profile", builtin_profiles()[0].settings)
    ]
    family = family_profile(model_type, architectures, model_name)
    if family is not None:
        layers.append((f"the {family.name} profile", family.settings))
    user_file = inline.pop(PROFILE_KEY, None) or file
    if user_file is not None:
        layers.append((f"file {str(user_file)!r}", read_mapping(user_file)))
    if inline:
        layers.append(("inline values", inline))

    merged: dict[str, Any] = {}
    for source, values in layers:
        try:
            UniSparseConfig.model_validate({**merged, **values})
        except ValidationError as err:
            raise _config_error(err, source) from None
        merged.update(values)
    return UniSparseConfig.model_validate(merged)


def config_from_vllm(
    additional_config: Mapping[str, Any] | None,
    hf_config: Any = None,
    model_name: str | None = None,
) -> UniSparseConfig:
    """The config for a vLLM engine: ``additional_config["unisparse"]`` plus model matching."""
    section = (additional_config or {}).get("unisparse", {})
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"additional_config['unisparse'] must be a mapping, got {type(section).__name__}"
        )
    return resolve_config(
        section,
        model_type=getattr(hf_config, "model_type", None),
        architectures=tuple(getattr(hf_config, "architectures", None) or ()),
        model_name=model_name,
    )
