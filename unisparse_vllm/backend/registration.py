"""Adding UNISPARSE to vLLM: the enum member, its pickling, and routing on the CPU platform.

Everything here runs in every vLLM process (the ``general_plugins`` entry point) and must
change nothing for users who select another backend.
"""

from __future__ import annotations

import copyreg
import logging
from typing import Any

from . import compat

logger = logging.getLogger("vllm.unisparse")  # a child of vLLM's configured logger

BACKEND_NAME = "UNISPARSE"
CUDA_BACKEND = "unisparse_vllm.backend.cuda.UniSparseFlashBackend"
CPU_BACKEND = "unisparse_vllm.backend.cpu.UniSparseCPUBackend"


def _backend_member(name: str) -> Any:
    """Unpickle an ``AttentionBackendEnum`` member by name, registering ours first if needed.

    vLLM's spawned engine processes unpickle ``VllmConfig`` before loading plugins, and enum
    members pickle by value: a runtime-added member would not be found. Members pickled
    through this reducer are rebuilt by name instead.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if name == BACKEND_NAME:
        register_backend()
    return AttentionBackendEnum[name]


def _reduce_member(member: Any) -> tuple[Any, tuple[str]]:
    return _backend_member, (member.name,)


def _route_cpu_platform() -> None:
    """vLLM's CPU platform always answers CPU_ATTN; honour UNISPARSE, leave the rest alone."""
    from vllm.platforms.cpu import CpuPlatform

    original: Any = CpuPlatform.get_attn_backend_cls
    if getattr(original, "_unisparse_routed", False):
        return

    def get_attn_backend_cls(cls: Any, selected_backend: Any, *args: Any, **kwargs: Any) -> str:
        if getattr(selected_backend, "name", None) == BACKEND_NAME:
            return CPU_BACKEND
        return original.__func__(cls, selected_backend, *args, **kwargs)

    get_attn_backend_cls._unisparse_routed = True  # type: ignore[attr-defined]
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)  # type: ignore[method-assign, assignment]


def register_backend() -> None:
    """Make ``--attention-backend unisparse`` (any case) resolve to our backend."""
    try:
        compat.check_supported()
    except RuntimeError as err:
        # Not raised here: users who do not select UNISPARSE must not be affected. Selecting
        # it imports a backend module, which raises this same error.
        logger.warning("%s; the UNISPARSE backend will refuse to start", err)
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    compat.add_enum_member(AttentionBackendEnum, BACKEND_NAME, CUDA_BACKEND)
    copyreg.pickle(AttentionBackendEnum, _reduce_member)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        _route_cpu_platform()
