import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Triton kernels run on the CPU through Triton's interpreter. It is read when kernels are
# decorated, so it must be set before anything imports them.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
