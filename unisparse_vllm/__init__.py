"""unisparse-vllm: training-free block-sparse prefill attention (UniSparse) for vLLM."""

from .version import __version__

__all__ = ["__version__", "register"]


def register() -> None:
    """vLLM ``general_plugins`` entry point. The backend is not wired yet: nothing to add."""
