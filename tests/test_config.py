"""Config resolution, profiles and the error messages users see."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from unisparse_vllm.config import (
    ConfigError,
    UniSparseConfig,
    builtin_profiles,
    config_from_vllm,
    family_profile,
    resolve_config,
)


def test_defaults_are_the_spec_where_measurements_did_not_change_it() -> None:
    config = resolve_config()
    assert (config.block_size, config.c_q, config.c_k, config.c_h) == (128, 4, 16, None)
    # local_blocks: the spec says 1; 2 measured better (docs/METHOD.md, RESULTS.md section 3)
    assert (config.mode, config.tau, config.sink_blocks, config.local_blocks) == (
        "top_p",
        0.9,
        1,
        2,
    )
    assert (config.min_sparse_tokens, config.dense_tail_blocks) == (8192, 1)


def test_every_builtin_profile_validates() -> None:
    names = [p.name for p in builtin_profiles()]
    assert names[0] == "default"
    assert {"llama", "qwen2", "qwen3", "mistral"} <= set(names)
    for profile in builtin_profiles():
        UniSparseConfig.model_validate(profile.settings)


def test_shipped_calibrated_profiles_load_by_name() -> None:
    from unisparse_vllm.config import calibrated_profiles

    names = list(calibrated_profiles())
    assert "qwen2.5-coder-0.5b-instruct" in names
    for name in names:
        config = resolve_config({"profile": name})
        overridden = {i for o in config.layer_overrides for i in o.layers}
        assert overridden or config.dense_layers, f"{name} sets no per-layer budget"
    with pytest.raises(ConfigError, match="nor is it a shipped calibrated profile"):
        resolve_config({"profile": "no-such-model"})


def test_the_shipped_qwen_profile_is_what_ruler_measured_at_each_length() -> None:
    """Its length tier is the density budget RULER measured at 32K (RESULTS.md section 4,
    twelfth run); shorter prompts take the taus the fifteenth run measured at 16K."""
    specs = Path(__file__).parents[1] / "benchmarks/ruler_specs"
    budget = resolve_config(file=specs / "qwen05-calibrated-16k-density021.yaml")
    measured_16k = resolve_config(file=specs / "qwen05-calibrated-16k-mid098-late085.yaml")
    config = resolve_config({"profile": "qwen2.5-coder-0.5b-instruct"}, model_type="qwen2")
    assert [config.tier_of(n) for n in (15600, 24575, 24576, 31500)] == [0, 0, 1, 1]
    for layer in range(24):
        base, long = config.tier_budgets(layer)
        assert long == budget.for_layer(layer), f"layer {layer}"
        assert base == measured_16k.for_layer(layer, 16384), f"layer {layer}"
    assert [config.for_layer(layer, 16384).tau for layer in range(6, 12)] == [0.98] * 6


def test_length_tiers_change_the_budget_of_long_prompts() -> None:
    config = resolve_config(
        {
            "tau": 0.9,
            "layer_overrides": [{"layers": ["0-3"], "tau": 0.95}],
            "length_tiers": [
                {"min_prompt_tokens": 16384, "layer_overrides": [{"layers": [1], "tau": 0.8}]},
                {
                    "min_prompt_tokens": 32768,
                    "layer_overrides": [{"layers": ["1-2"], "dense": True}],
                },
            ],
        }
    )
    assert [config.tier_of(n) for n in (0, 16383, 16384, 32767, 32768, 10**6)] == [0, 0, 1, 1, 2, 2]
    assert [(b.tau, b.dense) for b in config.tier_budgets(1)] == [
        (0.95, False),
        (0.8, False),
        (0.8, True),
    ]
    assert [(b.tau, b.dense) for b in config.tier_budgets(2)] == [
        (0.95, False),
        (0.95, False),
        (0.95, True),
    ]
    assert config.for_layer(1, 20000) == config.tier_budgets(1)[1]
    assert config.for_layer(5, 10**6) == config.for_layer(5)  # no tier touches layer 5


@pytest.mark.parametrize(
    "tiers,message",
    [
        (
            [
                {"min_prompt_tokens": 32768, "layer_overrides": [{"layers": [0], "tau": 0.8}]},
                {"min_prompt_tokens": 16384, "layer_overrides": [{"layers": [0], "tau": 0.7}]},
            ],
            r"length_tiers = .*min_prompt_tokens must increase .*\[32768, 16384\]",
        ),
        (
            [{"min_prompt_tokens": 0, "layer_overrides": [{"layers": [0], "tau": 0.8}]}],
            r"length_tiers\.0\.min_prompt_tokens = 0",
        ),
        ([{"min_prompt_tokens": 100, "layer_overrides": []}], r"length_tiers\.0\.layer_overrides"),
        (
            [{"min_prompt_tokens": 100, "layer_overrides": [{"layers": [0], "tau": 2}]}],
            r"length_tiers\.0\.layer_overrides\.0\.tau = 2",
        ),
        ([{"min_prompt_tokens": 100, "tau": 0.8}], r"length_tiers\.0\.layer_overrides"),
    ],
)
def test_bad_length_tiers_are_named(tiers: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config({"length_tiers": tiers})


def test_a_tier_that_breaks_a_layer_budget_is_named() -> None:
    tier = {"min_prompt_tokens": 100, "layer_overrides": [{"layers": [0], "max_blocks": 1}]}
    config = resolve_config({"length_tiers": [tier]})
    assert config.for_layer(0).max_blocks is None
    with pytest.raises(
        ConfigError, match=r"length_tiers \(prompts of >= 100 tokens\).*max_blocks=1"
    ):
        config.tier_budgets(0)


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(model_type="llama"), "llama"),
        (dict(architectures=["Qwen2ForCausalLM"]), "qwen2"),
        (dict(model_name="/models/Qwen3-8B"), "qwen3"),
        (dict(model_name="mistralai/Mistral-7B-v0.3"), "mistral"),
        (dict(model_type="gpt2"), None),
    ],
)
def test_family_profile_matching(kwargs: dict, expected: str | None) -> None:
    profile = family_profile(**kwargs)
    assert (profile.name if profile else None) == expected


def test_precedence_default_family_file_inline(tmp_path) -> None:
    assert resolve_config(model_type="llama").dense_layers == [0]
    user = tmp_path / "mine.yaml"
    user.write_text("dense_layers: [0, 1]\ntau: 0.8\nblock_size: 64\n")
    from_file = resolve_config(file=user, model_type="llama")
    assert (from_file.dense_layers, from_file.tau, from_file.block_size) == ([0, 1], 0.8, 64)
    both = resolve_config({"profile": str(user), "tau": 0.95}, model_type="llama")
    assert (both.tau, both.dense_layers) == (0.95, [0, 1])


def test_json_profile_file(tmp_path) -> None:
    user = tmp_path / "p.json"
    user.write_text(json.dumps({"mode": "topk", "density": 0.2}))
    config = resolve_config(file=user)
    assert (config.mode, config.density) == ("topk", 0.2)


@pytest.mark.parametrize(
    "inline,words",
    [
        ({"tua": 0.9}, ["unknown field 'tua'", "tau"]),
        ({"tau": 1.5}, ["tau = 1.5", "less than or equal to 1"]),
        ({"tau": 0}, ["tau = 0", "greater than 0"]),
        ({"c_q": 24}, ["c_q = 24", "divide block_size=128"]),
        ({"block_size": 96}, ["block_size = 96", "64", "128"]),
        ({"sink_blocks": -1}, ["sink_blocks = -1", "greater than or equal to 0"]),
        ({"local_blocks": 0}, ["local_blocks = 0"]),
        ({"max_blocks": 1}, ["max_blocks=1", "sink_blocks + local_blocks = 3"]),
        ({"dense_layers": [-2]}, ["dense_layers", "-2"]),
        ({"dense_layers": ["0-3", "5-2"]}, ["dense_layers", "'5-2'"]),
        ({"mode": "random"}, ["mode = 'random'", "top_p", "topk"]),
        ({"layer_overrides": [{"layers": ["3-1"], "tau": 0.5}]}, ["layer_overrides", "'3-1'"]),
        ({"layer_overrides": [{"layers": [2], "tau": 2.0}]}, ["layer_overrides.0.tau", "2.0"]),
    ],
)
def test_bad_values_name_field_and_value(inline: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(inline)
    message = str(err.value)
    assert "inline values" in message
    for word in words:
        assert word in message


def test_c_h_must_divide_the_group() -> None:
    assert resolve_config({"c_h": 2}).heads_per_selection(8, 2) == 2
    assert resolve_config().heads_per_selection(14, 2) == 7
    with pytest.raises(ConfigError, match=r"c_h = 3: must divide the GQA group size 4"):
        resolve_config({"c_h": 3}).heads_per_selection(8, 2)


def test_layer_overrides_and_dense_layers() -> None:
    config = resolve_config(
        {
            "dense_layers": [0, "9-10"],
            "layer_overrides": [
                {"layers": ["2-4"], "tau": 0.97},
                {"layers": [4, "7"], "mode": "topk", "density": 0.3},
            ],
        }
    )
    assert config.dense_layers == [0, 9, 10]  # ranges as in layer_overrides
    assert config.for_layer(0).dense and not config.for_layer(1).dense
    assert config.for_layer(1).tau == 0.9
    assert config.for_layer(3).tau == 0.97
    layer4 = config.for_layer(4)
    assert (layer4.tau, layer4.mode, layer4.density) == (0.97, "topk", 0.3)
    assert config.for_layer(7).mode == "topk" and config.for_layer(5).mode == "top_p"


def test_override_breaking_a_cross_field_rule_names_the_layer() -> None:
    config = resolve_config(
        {"max_blocks": 4, "layer_overrides": [{"layers": [1], "sink_blocks": 4}]}
    )
    with pytest.raises(ConfigError, match=r"layer 1.*max_blocks=4"):
        config.for_layer(1)


def test_file_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(file=tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("tau: [0.9\n")
    with pytest.raises(ConfigError, match="does not parse"):
        resolve_config(file=broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve_config(file=listing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("tau: 7\n")
    with pytest.raises(ConfigError, match=r"from file .*bad.yaml.*tau = 7"):
        resolve_config(file=bad)


def test_config_from_vllm_section() -> None:
    hf = SimpleNamespace(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    config = config_from_vllm({"unisparse": {"tau": 0.85}}, hf)
    assert (config.tau, config.dense_layers) == (0.85, [0])
    assert config_from_vllm(None, None) == resolve_config()
    with pytest.raises(ConfigError, match="must be a mapping"):
        config_from_vllm({"unisparse": 3}, hf)


def test_readme_documents_every_field_with_its_default() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, value in UniSparseConfig().model_dump(mode="json").items():
        shown = value if isinstance(value, str) else json.dumps(value)
        row = f"| `{name}` | `{shown}` |"
        assert row in readme, f"README config table lacks or mis-documents {name}: {row}"
