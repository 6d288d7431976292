"""unisparse-vllm: training-free block-sparse prefill attention (UniSparse) for vLLM."""

from .version import __version__

__all__ = ["__version__", "register"]


def register() -> None:
    """vLLM ``general_plugins`` entry point: adds the UNISPARSE attention backend.

    Imported lazily so that ``import unisparse_vllm`` never needs vLLM.
    """
    from .backend.registration import register_backend

    register_backend()
