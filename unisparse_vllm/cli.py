"""The ``unisparse`` command: inspect and validate configs, run the demo."""

from __future__ import annotations

import argparse
import itertools
import sys
import typing

import yaml

from .config import (
    ConfigError,
    UniSparseConfig,
    parse_layer_spec,
    profile_file,
    read_mapping,
    resolve_config,
)


def _config_show(args: argparse.Namespace) -> int:
    config = resolve_config(file=args.file, model_type=args.model_type, model_name=args.model_name)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _config_validate(args: argparse.Namespace) -> int:
    resolve_config(file=args.file)
    print(f"{args.file}: valid")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    config = resolve_config({"min_sparse_tokens": 0, "block_size": args.block_size})
    print(
        f"UniSparse demo: synthetic long-context case, {args.seq_len} tokens, 8 query / 2 KV "
        f"heads, head_dim 64, block {config.block_size}, c_q={config.c_q}, c_k={config.c_k}, "
        "core reference on the CPU"
    )
    print(format_table(run_demo(seq_len=args.seq_len, config=config, seed=args.seed)))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .calibrate import (
        DEFAULT_TAUS,
        calibrate,
        check_length_tier,
        mean_density,
        measuring_device,
        measuring_dtype,
        with_length_tier,
        write_profile,
    )

    if (args.tier_of is None) != (args.min_prompt_tokens is None):
        raise ConfigError("--tier-of and --min-prompt-tokens go together")
    if args.min_prompt_tokens is not None and args.min_prompt_tokens < 1:
        raise ConfigError(f"--min-prompt-tokens must be >= 1, got {args.min_prompt_tokens}")
    device = measuring_device(args.device)
    recall, density = args.target_recall, args.target_density
    if density is None:
        recall = 0.95 if recall is None else recall
        if not 0 <= recall <= 1:
            raise ConfigError(f"--target-recall must be in [0, 1], got {recall}")
    elif not 0 < density <= 1:
        raise ConfigError(f"--target-density must be in (0, 1], got {density}")
    layer_recall = _layer_recalls(args.layer_recall or [])
    texts = [Path(f).read_text(errors="ignore") for f in args.text]
    model_type = _model_type(args.model)
    config = resolve_config(
        {
            name: value
            for name, value in (
                ("c_q", args.c_q),
                ("c_k", args.c_k),
                ("c_h", args.c_h),
                ("estimator", args.estimator),
                ("max_mix", args.max_mix),
            )
            if value is not None
        }
        | {"block_size": args.block_size},
        model_type=model_type,
        model_name=args.model,
    )
    if args.tier_of is not None:
        base_config = resolve_config(
            file=args.tier_of, model_type=model_type, model_name=args.model
        )
        check_length_tier(base_config, config, args.min_prompt_tokens)
    settings, choices, used = calibrate(
        args.model,
        texts,
        target_recall=recall,
        target_density=density,
        tokens=args.tokens,
        config=config,
        taus=tuple(args.taus) if args.taus else DEFAULT_TAUS,
        device=device,
        layer_recall=layer_recall,
    )
    if density is None:
        target = f"target mean attention-mass recall {recall}"
    else:
        sparse = [c.recall for c in choices if c.tau is not None and c.layer not in layer_recall]
        which = "every other" if layer_recall else "every"
        target = (
            f"target mean density {density} over the layers (reached "
            f"{mean_density(choices):.3f}, {which} sparse layer at mean recall >= "
            f"{min(sparse, default=1.0):.3f})"
        )
    if layer_recall:
        target += f", layers' own recall targets {' '.join(args.layer_recall)}"
    header = (
        f"unisparse calibrate: {args.model}, {used} tokens of {len(texts)} text(s), {target}, "
        f"model in {str(measuring_dtype(device)).removeprefix('torch.')} on {device}"
    )
    preamble = ""
    if args.tier_of is not None:
        calibrated = UniSparseConfig.model_validate({**config.model_dump(), **settings})
        settings = with_length_tier(
            read_mapping(args.tier_of),
            base_config,
            calibrated,
            args.min_prompt_tokens,
            len(choices),
        )
        # The base's comment lines (what it was measured with) stay above the tier's.
        lines = profile_file(args.tier_of).read_text().splitlines()
        preamble = "".join(f"{line}\n" for line in itertools.takewhile(_is_comment, lines))
        header = f"length tier from {args.min_prompt_tokens} prompt tokens: {header}"
    write_profile(settings, Path(args.out), choices, header, preamble)
    resolve_config(file=args.out)  # what we wrote must load
    dense = sum(c.tau is None for c in choices)
    print(f"{args.out}: {len(choices)} layers, {dense} dense")
    return 0


def _layer_recalls(specs: list[str]) -> dict[int, float]:
    """``["6-11=0.98", "18=0.85"]`` -> {6: 0.98, ..., 11: 0.98, 18: 0.85}."""
    recalls: dict[int, float] = {}
    for spec in specs:
        layers, _, value = spec.partition("=")
        try:
            first, last = parse_layer_spec(layers)
            recall = float(value)
        except ValueError:
            raise ConfigError(
                f"--layer-recall {spec!r}: expected LAYERS=RECALL, e.g. 6-11=0.98"
            ) from None
        if not 0 <= recall <= 1:
            raise ConfigError(f"--layer-recall {spec!r}: recall must be in [0, 1]")
        for layer in range(first, last + 1):
            if layer in recalls:
                raise ConfigError(f"--layer-recall {spec!r}: layer {layer} already has a target")
            recalls[layer] = recall
    return recalls


def _is_comment(line: str) -> bool:
    return line.startswith("#")


def _model_type(model: str) -> str | None:
    import json
    from pathlib import Path

    config = Path(model) / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unisparse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="show or validate a sparsity config")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the resolved config")
    show.add_argument("--model-type", help="hf_config.model_type to match a family profile")
    show.add_argument("--model-name", help="model name or path to match a family profile")
    show.add_argument("--file", help="a user profile (YAML or JSON)")
    show.set_defaults(run=_config_show)
    validate = config_commands.add_parser("validate", help="check a profile file")
    validate.add_argument("file")
    validate.set_defaults(run=_config_validate)

    demo = commands.add_parser("demo", help="run the method on a synthetic long-context case")
    demo.add_argument("--seq-len", type=int, default=8192)
    demo.add_argument("--block-size", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    calibrate = commands.add_parser(
        "calibrate", help="per-layer tau / dense layers from real activations -> profile YAML"
    )
    calibrate.add_argument("--model", required=True, help="a Hugging Face model folder")
    calibrate.add_argument("--text", nargs="+", required=True, help="calibration text files")
    target = calibrate.add_mutually_exclusive_group()
    target.add_argument(
        "--target-recall",
        type=float,
        help="mean share of the exact attention mass each layer keeps (default 0.95)",
    )
    target.add_argument(
        "--target-density",
        type=float,
        help="instead: a compute budget, the mean density over the layers at --tokens; "
        "every layer is held to the highest recall that fits",
    )
    calibrate.add_argument(
        "--layer-recall",
        nargs="+",
        metavar="LAYERS=RECALL",
        help="a recall target of their own for some layers, e.g. 6-11=0.98 18-23=0.85 (the "
        "layers whose sparsity moves the answer most or least; README, 'Calibrating')",
    )
    calibrate.add_argument("--tokens", type=int, default=4096)
    calibrate.add_argument("--block-size", type=int, default=128)
    calibrate.add_argument("--c-q", type=int, help="queries pooled (default: the profile's)")
    calibrate.add_argument("--c-k", type=int, help="keys pooled (default: the profile's)")
    calibrate.add_argument("--c-h", type=int, help="query heads pooled (default: the profile's)")
    calibrate.add_argument(
        "--estimator",
        choices=typing.get_args(UniSparseConfig.model_fields["estimator"].annotation),
        help="block scores to calibrate (default: unisparse); a peer's rule calibrated the "
        "same way compares the scores alone at one recall",
    )
    calibrate.add_argument(
        "--max-mix",
        type=float,
        help="peak term mixed into the block mass (default: the profile's); recorded in the "
        "profile, since the recall of a tau depends on it",
    )
    calibrate.add_argument(
        "--taus",
        type=float,
        nargs="+",
        help="taus tried per layer (default: calibrate.DEFAULT_TAUS)",
    )
    calibrate.add_argument(
        "--device",
        default="auto",
        help="where the model and the measurements run: auto (a GPU if there is one), cpu, "
        "cuda or cuda:N",
    )
    calibrate.add_argument(
        "--tier-of",
        metavar="PROFILE",
        help="write PROFILE (a file or a shipped profile's name) with this calibration as a "
        "length tier for prompts of at least --min-prompt-tokens",
    )
    calibrate.add_argument("--min-prompt-tokens", type=int, help="where --tier-of's tier starts")
    calibrate.add_argument("--out", required=True)
    calibrate.set_defaults(run=_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
