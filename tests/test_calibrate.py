"""``unisparse calibrate`` on the tiny random Llama: profile written, loadable, per layer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from unisparse_vllm.cli import main
from unisparse_vllm.config import resolve_config

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), num_layers=3)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    from tiny_model import corpus

    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text("\n".join(corpus(300)))
    return path


def _calibrate(
    tiny: Path, text: Path, out: Path, target: float, taus: tuple[str, ...] = ("0.5", "0.8", "0.95")
) -> dict:
    argv = ["calibrate", "--model", str(tiny), "--text", str(text), "--tokens", "512"]
    argv += ["--block-size", "64", "--c-q", "8", "--c-k", "8", "--target-recall", str(target)]
    argv += ["--out", str(out), "--taus", *taus]
    assert main(argv) == 0
    return yaml.safe_load(out.read_text())


def test_calibration_writes_a_loadable_per_layer_profile(
    tiny: Path, text: Path, tmp_path: Path
) -> None:
    out = tmp_path / "profile.yaml"
    settings = _calibrate(tiny, text, out, target=0.5)
    assert (settings["block_size"], settings["c_q"], settings["c_k"]) == (64, 8, 8)
    sparse_layers = [o["layers"][0] for o in settings["layer_overrides"]]
    assert sorted(sparse_layers + settings["dense_layers"]) == [0, 1, 2]
    assert all(o["tau"] in (0.5, 0.8, 0.95) for o in settings["layer_overrides"])
    header = out.read_text().splitlines()[:4]
    assert all(line.startswith("#") for line in header) and "layer 2" in header[3]
    assert header[0].endswith("model in float32 on cpu")  # how it was measured
    config = resolve_config(file=out)
    assert config.block_size == 64


def test_a_peer_calibrated_selects_with_its_own_scores(
    tiny: Path, text: Path, tmp_path: Path
) -> None:
    out = tmp_path / "xattention.yaml"
    argv = ["calibrate", "--model", str(tiny), "--text", str(text), "--tokens", "512"]
    argv += ["--block-size", "64", "--estimator", "xattention", "--target-recall", "0.5"]
    assert main([*argv, "--taus", "0.5", "0.9", "--out", str(out)]) == 0
    assert resolve_config(file=out).estimator == "xattention"
    ours = _calibrate(tiny, text, tmp_path / "ours.yaml", target=0.5)
    assert ours["estimator"] == "unisparse"  # recorded either way: recall depends on it
    assert ours["max_mix"] == 0.0


def test_a_calibration_with_the_peak_term_records_it(
    tiny: Path, text: Path, tmp_path: Path
) -> None:
    """The peak term changes the block mass, hence the recall a tau reaches: a profile
    calibrated with it must select with it."""
    out = tmp_path / "peak.yaml"
    argv = ["calibrate", "--model", str(tiny), "--text", str(text), "--tokens", "512"]
    argv += ["--block-size", "64", "--c-k", "4", "--max-mix", "0.5", "--target-recall", "0.5"]
    assert main([*argv, "--taus", "0.5", "0.9", "--out", str(out)]) == 0
    config = resolve_config(file=out)
    assert (config.c_k, config.max_mix) == (4, 0.5)


def test_unreachable_recall_makes_every_layer_dense(tiny: Path, text: Path, tmp_path: Path) -> None:
    # tau 0.05 keeps little more than the sink and diagonal blocks: far below 0.999 recall.
    settings = _calibrate(tiny, text, tmp_path / "dense.yaml", target=0.999, taus=("0.05",))
    assert settings["dense_layers"] == [0, 1, 2] and settings["layer_overrides"] == []


def test_trivial_recall_takes_the_smallest_tau(tiny: Path, text: Path, tmp_path: Path) -> None:
    settings = _calibrate(tiny, text, tmp_path / "loose.yaml", target=0.0)
    assert settings["dense_layers"] == []
    assert [o["tau"] for o in settings["layer_overrides"]] == [0.5, 0.5, 0.5]


def test_each_layer_is_estimated_once_for_all_taus(monkeypatch) -> None:
    """Only selection depends on tau; each tau's plan must equal a fresh estimate's."""
    import torch

    from unisparse_vllm import calibrate
    from unisparse_vllm.core import ContiguousKV, PrefillBatch, plan_prefill
    from unisparse_vllm.core.baselines import ESTIMATORS

    calls = []
    reference = ESTIMATORS["unisparse"]
    monkeypatch.setitem(
        ESTIMATORS, "unisparse", lambda *a, **k: calls.append(1) or reference(*a, **k)
    )
    gen = torch.Generator().manual_seed(0)
    query, keys = torch.randn(512, 4, 16, generator=gen), torch.randn(512, 2, 16, generator=gen)
    config = resolve_config({"block_size": 64, "c_q": 8, "c_k": 8, "min_sparse_tokens": 0})
    taus = (0.5, 0.7, 0.9)
    curve = calibrate.layer_curve(query, keys, 1, config, taus)
    choice = calibrate.choose_for_recall(curve, 1.01)  # tries all
    assert len(calls) == 1 and choice.tau is None
    budget = config.for_layer(1).model_copy(update={"tau": 0.9})
    fresh = plan_prefill(
        query,
        ContiguousKV(keys, keys, (0,)),
        PrefillBatch.from_lens([512]),
        config,
        budget,
        scale=0.25,
    )
    assert choice.density == fresh.density()


def _point(layer: int, tau: float, recall: float, density: float):
    from unisparse_vllm.calibrate import LayerChoice

    return LayerChoice(layer, tau, recall, density)


CURVES = [
    [_point(0, 0.5, 0.80, 0.10), _point(0, 0.8, 0.90, 0.20), _point(0, 0.95, 0.97, 0.40)],
    [_point(1, 0.5, 0.70, 0.15), _point(1, 0.8, 0.85, 0.30), _point(1, 0.95, 0.92, 0.50)],
]


@pytest.mark.parametrize(
    ("budget", "taus"),
    [
        (0.25, [0.8, 0.8]),  # recall >= 0.85 fits exactly; 0.90 would cost 0.35
        (0.24, [0.5, 0.8]),  # one step less: recall >= 0.80 at 0.20
        (0.75, [0.95, None]),  # recall >= 0.97: layer 1 dense, counted as 1 (0.70)
        (0.69, [0.95, 0.95]),  # recall >= 0.92 at 0.45: dense layer 1 no longer fits
    ],
)
def test_a_density_budget_buys_the_highest_recall_every_layer_can_keep(budget, taus) -> None:
    from unisparse_vllm.calibrate import choose_for_density

    assert [c.tau for c in choose_for_density(CURVES, budget)] == taus


@pytest.mark.parametrize(
    ("budget", "taus"),
    [
        (0.45, [0.95, 0.95]),  # layer 1 at its own 0.92 (0.50) leaves layer 0 0.40: recall 0.97
        (0.35, [0.8, 0.95]),  # 0.20 left for layer 0: recall 0.90
    ],
)
def test_a_layer_with_its_own_recall_keeps_it_and_the_budget_pays_for_it(budget, taus) -> None:
    from unisparse_vllm.calibrate import choose_for_density

    assert [c.tau for c in choose_for_density(CURVES, budget, {1: 0.92})] == taus


def test_a_budget_the_fixed_layers_alone_exceed_is_refused() -> None:
    from unisparse_vllm.calibrate import choose_for_density
    from unisparse_vllm.config import ConfigError

    with pytest.raises(ConfigError, match=r"own targets, gives mean density 0.300"):
        choose_for_density(CURVES, 0.29, {1: 0.92})  # 0.50 + layer 0's least 0.10
    choices = choose_for_density(CURVES, 0.35, {0: 0.85, 1: 0.85})  # every layer's own
    assert [c.tau for c in choices] == [0.8, 0.8]


def test_a_density_budget_below_the_smallest_tau_is_refused() -> None:
    from unisparse_vllm.calibrate import choose_for_density
    from unisparse_vllm.config import ConfigError

    with pytest.raises(ConfigError, match=r"target_density 0.1: .* mean density 0.125"):
        choose_for_density(CURVES, 0.1)


def test_the_command_line_calibrates_to_a_density_budget(
    tiny: Path, text: Path, tmp_path: Path
) -> None:
    """A tighter budget: lower density and lower recall, each within what the header says."""

    def per_layer(budget: str) -> tuple[str, list[tuple[float, float]]]:
        out = tmp_path / f"budget-{budget}.yaml"
        argv = ["calibrate", "--model", str(tiny), "--text", str(text), "--tokens", "512"]
        argv += ["--block-size", "64", "--c-q", "8", "--c-k", "8", "--target-density", budget]
        assert main([*argv, "--taus", "0.05", "0.5", "0.95", "--out", str(out)]) == 0
        resolve_config(file=out)
        lines = out.read_text().splitlines()
        measured = re.findall(r"mean recall ([0-9.]+), density ([0-9.]+)", "\n".join(lines[1:4]))
        return lines[0], [(float(r), float(d)) for r, d in measured]

    _, loose = per_layer("1.0")
    tight_header, tight = per_layer("0.8")
    assert "target mean density 0.8 over the layers" in tight_header
    assert sum(d for _, d in tight) / 3 <= 0.8 < sum(d for _, d in loose) / 3
    assert min(r for r, _ in tight) < min(r for r, _ in loose)
    assert f"mean recall >= {min(r for r, _ in tight):.3f}" in tight_header


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-density", "0"], "--target-density must be in (0, 1], got 0.0"),
        (["--target-recall", "1.5"], "--target-recall must be in [0, 1], got 1.5"),
        (["--taus", "0.9", "1.2"], "taus: each must be in (0, 1], got [0.9, 1.2]"),
    ],
)
def test_bad_calibration_targets_are_named(
    tiny: Path, text: Path, tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    argv = ["calibrate", "--model", str(tiny), "--text", str(text), "--tokens", "512"]
    assert main([*argv, *extra, "--out", str(tmp_path / "p.yaml")]) == 2
    assert message in capsys.readouterr().err


def test_layers_given_their_own_recall_are_calibrated_to_it(
    tiny: Path, text: Path, tmp_path: Path
) -> None:
    """Trivial common target, unreachable own target on layer 1: only layer 1 goes dense."""
    out = tmp_path / "own.yaml"
    argv = ["calibrate", "--model", str(tiny), "--text", str(text), "--tokens", "512"]
    argv += ["--block-size", "64", "--c-q", "8", "--c-k", "8", "--target-recall", "0"]
    argv += ["--layer-recall", "1=0.999", "--taus", "0.05", "0.5", "--out", str(out)]
    assert main(argv) == 0
    settings = yaml.safe_load(out.read_text())
    assert settings["dense_layers"] == [1]
    assert [(o["layers"], o["tau"]) for o in settings["layer_overrides"]] == [
        ([0], 0.05),
        ([2], 0.05),
    ]
    assert "layers' own recall targets 1=0.999" in out.read_text().splitlines()[0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("6-11", "--layer-recall '6-11': expected LAYERS=RECALL, e.g. 6-11=0.98"),
        ("a=0.9", "--layer-recall 'a=0.9': expected LAYERS=RECALL"),
        ("1=1.5", "--layer-recall '1=1.5': recall must be in [0, 1]"),
        ("0-1=0.9 1=0.8", "--layer-recall '1=0.8': layer 1 already has a target"),
        ("2-4=0.9", "layer_recall: layers [3, 4] are past the model's 3 layers"),
    ],
)
def test_bad_layer_recall_targets_are_named(
    tiny: Path, text: Path, tmp_path: Path, capsys, monkeypatch, spec: str, message: str
) -> None:
    """Each refused before the model's forward pass, the calibration's cost."""
    from unisparse_vllm import calibrate

    monkeypatch.setattr(calibrate, "capture_qkv", lambda *a: pytest.fail("forward pass ran"))
    argv = ["calibrate", "--model", str(tiny), "--text", str(text), "--tokens", "512"]
    argv += ["--block-size", "64", "--c-q", "8", "--c-k", "8", "--taus", "0.5"]
    assert main([*argv, "--layer-recall", *spec.split(), "--out", str(tmp_path / "p.yaml")]) == 2
    assert message in capsys.readouterr().err


def test_a_calibration_takes_one_target(text: Path, tmp_path: Path) -> None:
    argv = ["calibrate", "--model", "m", "--text", str(text), "--out", str(tmp_path / "p.yaml")]
    with pytest.raises(SystemExit):
        main([*argv, "--target-recall", "0.9", "--target-density", "0.2"])


def test_the_command_line_tries_the_default_taus_and_pools_as_asked(
    monkeypatch, text: Path, tmp_path: Path
) -> None:
    from unisparse_vllm import calibrate

    class Seen(Exception):
        pass

    def record(model: str, texts: list[str], **kwargs) -> None:
        raise Seen(kwargs["taus"], kwargs["config"])

    monkeypatch.setattr(calibrate, "calibrate", record)
    argv = ["calibrate", "--model", "m", "--text", str(text), "--out", str(tmp_path / "p.yaml")]
    with pytest.raises(Seen) as seen:
        main(argv)
    taus, config = seen.value.args
    assert taus == calibrate.DEFAULT_TAUS
    assert (config.c_q, config.c_k) == (4, 16)
    with pytest.raises(Seen) as seen:
        main([*argv, "--c-q", "16", "--c-k", "8"])
    assert (seen.value.args[1].c_q, seen.value.args[1].c_k) == (16, 8)


def test_the_calibration_device_is_checked_and_passed_on(
    monkeypatch, text: Path, tmp_path: Path, capsys
) -> None:
    import torch

    from unisparse_vllm import calibrate

    class Seen(Exception):
        pass

    def record(model: str, texts: list[str], **kwargs) -> None:
        raise Seen(kwargs["device"])

    monkeypatch.setattr(calibrate, "calibrate", record)
    argv = ["calibrate", "--model", "m", "--text", str(text), "--out", str(tmp_path / "p.yaml")]
    with pytest.raises(Seen) as seen:
        main(argv)  # auto
    assert seen.value.args[0] == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(Seen) as seen:
        main([*argv, "--device", "cpu"])
    assert seen.value.args[0] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*argv, "--device", "cuda:1"]) == 2
    assert "--device cuda:1: no CUDA device is available here" in capsys.readouterr().err


def test_a_calibration_becomes_a_length_tier_of_a_profile(
    tiny: Path, text: Path, tmp_path: Path
) -> None:
    """--tier-of: shorter prompts keep the base's budgets, longer ones take exactly what the
    same calibration alone would have written; the base's comment lines stay."""
    base_file = tmp_path / "base.yaml"
    _calibrate(tiny, text, base_file, 0.95, ("0.05", "0.5", "0.95"))
    argv = ["calibrate", "--model", str(tiny), "--text", str(text), "--tokens", "512"]
    argv += ["--block-size", "64", "--c-q", "8", "--c-k", "8", "--target-density", "0.8"]
    argv += ["--taus", "0.05", "0.5", "0.95"]
    alone, tiered = tmp_path / "alone.yaml", tmp_path / "tiered.yaml"
    assert main([*argv, "--out", str(alone)]) == 0
    tier = ["--tier-of", str(base_file), "--min-prompt-tokens", "4096"]
    assert main([*argv, *tier, "--out", str(tiered)]) == 0

    base, long, config = (resolve_config(file=f) for f in (base_file, alone, tiered))
    assert [t.min_prompt_tokens for t in config.length_tiers] == [4096]
    assert config.length_tiers[0].layer_overrides, "the budget changes no layer"
    for layer in range(3):
        assert config.tier_budgets(layer) == (base.for_layer(layer), long.for_layer(layer))
    comments = [line for line in base_file.read_text().splitlines() if line.startswith("#")]
    lines = tiered.read_text().splitlines()
    assert lines[: len(comments)] == comments
    assert lines[len(comments)].startswith("# length tier from 4096 prompt tokens: unisparse")


def test_a_tier_keeps_its_taus_when_the_base_is_edited_later() -> None:
    """Layer 0's tau is the same in base and tier; the tier still says it, so a base edit
    (here 0.9 -> 0.5) does not reach the tier's prompts."""
    from unisparse_vllm.calibrate import with_length_tier

    def taus(*values: float) -> dict:
        return {
            "layer_overrides": [{"layers": [i], "tau": t} for i, t in enumerate(values)],
            "dense_layers": [2],
        }

    base = taus(0.9, 0.8)
    tiered = with_length_tier(
        base, resolve_config(base), resolve_config(taus(0.9, 0.7) | {"dense_layers": []}), 4096, 3
    )
    edited = resolve_config(tiered | taus(0.5, 0.5))
    assert [edited.for_layer(layer, 4096).tau for layer in range(2)] == [0.9, 0.7]
    assert not edited.for_layer(2, 4096).dense and edited.for_layer(2, 100).dense


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--c-q", "4"], "the base profile has c_q = 8, this calibration 4"),
        (["--c-q", "8", "--min-prompt-tokens", "100"], "must exceed the base profile's last"),
        (["--c-q", "8", "--min-prompt-tokens", "0"], "--min-prompt-tokens must be >= 1, got 0"),
        (["--c-q", "8", "--tier-of", "x.yaml"], "--tier-of and --min-prompt-tokens go together"),
    ],
)
def test_a_tier_that_cannot_join_its_base_is_refused_before_calibrating(
    tiny: Path, text: Path, tmp_path: Path, capsys, monkeypatch, extra: list[str], message: str
) -> None:
    from unisparse_vllm import calibrate

    base = tmp_path / "base.yaml"
    tier = {"min_prompt_tokens": 1000, "layer_overrides": [{"layers": [0], "tau": 0.5}]}
    base.write_text(yaml.safe_dump({"block_size": 64, "c_q": 8, "c_k": 8, "length_tiers": [tier]}))
    monkeypatch.setattr(calibrate, "calibrate", lambda *a, **k: pytest.fail("calibrated"))
    argv = ["calibrate", "--model", str(tiny), "--text", str(text), "--block-size", "64"]
    argv += ["--c-k", "8", "--target-density", "0.8", "--out", str(tmp_path / "p.yaml")]
    if "--tier-of" not in extra:
        argv += ["--tier-of", str(base)]
        argv += [] if "--min-prompt-tokens" in extra else ["--min-prompt-tokens", "2000"]
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err
