"""The attention kernel's code for Hopper, compiled ahead of time on any machine (Triton
compiles for a named target without a GPU): its two dots must lower to warpgroup MMA
(wgmma), the tensor-core path the kernel's speed depends on. A change that silently drops it
to the older mma.sync path (an fp32 operand, a layout the MMA cannot take) fails here, on
the CPU, instead of showing up as a slow benchmark.

The compile runs in a child process: the tests' Triton interpreter (TRITON_INTERPRET=1 on
the CPU) replaces ``triton.jit`` functions at import, and the compiler needs the real ones."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
TENSORS = {"q_ptr", "k_ptr", "v_ptr", "out_ptr"}


def hopper_ir(dtype: str, head_dim: int, block: int = 128) -> str:
    """TTGIR of the attention kernel for sm_90 at the launch the dispatch would use: every
    dot Triton maps to warpgroup MMA is a ``ttng.warp_group_dot`` there; a ``tt.dot`` left
    over is one computed without tensor cores."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from unisparse_vllm.kernels.attention import _sparse_attention_kernel, default_launch

    names = list(inspect.signature(_sparse_attention_kernel.fn).parameters)
    launch = default_launch(block, head_dim)
    constexprs = {
        "GROUP": 4,
        "HEADS_PER_SELECTION": 4,
        "BLOCK_SIZE": block,
        "HEAD_DIM": head_dim,
        "BLOCK_D": triton.next_power_of_2(head_dim),
        "BLOCK_N": launch.block_n,
        "DOT_PRECISION": "tf32",
    }
    signature = {
        name: "constexpr"
        if name in constexprs
        else f"*{dtype}"
        if name in TENSORS
        else "*i32"
        if name.endswith("_ptr")
        else "fp32"
        if name == "qk_scale"
        else "i32"
        for name in names
    }
    source = ASTSource(
        _sparse_attention_kernel,
        signature,
        constexprs={(names.index(name),): value for name, value in constexprs.items()},
    )
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 64), options=options)
    return compiled.asm["ttgir"]


@pytest.mark.parametrize(("dtype", "head_dim"), [("bf16", 128), ("fp16", 64)])
def test_attention_kernel_uses_warpgroup_mma_on_hopper(dtype, head_dim):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run(
        [sys.executable, __file__, dtype, str(head_dim)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    ir = child.stdout
    assert ir.count("ttng.warp_group_dot ") == 4  # Q K^T and P V, off and on the diagonal
    assert "tt.dot " not in ir


if __name__ == "__main__":
    print(hopper_ir(sys.argv[1], int(sys.argv[2])))
