"""Block selection in one kernel: ``core.select_blocks`` with one program per (head, row).

The reference sorts, scatters and compacts whole ``[H, rows, W]`` tensors (a dozen launches
and as many full-size intermediates). Here each program holds its row in registers: sort
the free blocks' mass, read the top-p (or top-k) count off the cumulative sum, keep the
blocks above the cut (ties broken by block index, as the reference's stable sort does),
add the forced sink/local blocks, and write the chosen indices compacted and ascending.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import LayerBudget

_TOP_P, _TOP_K, _ALL = 0, 1, 2


@triton.jit(
    do_not_specialize=["stride_mh", "stride_mr", "stride_ch", "stride_ih", "stride_ir", "width"]
)
def _select_kernel(
    mass_ptr,
    query_block_ptr,
    row_total_ptr,
    dense_ptr,
    counts_ptr,
    indices_ptr,
    stride_mh,
    stride_mr,
    stride_ch,
    stride_ih,
    stride_ir,
    width,
    sink_blocks,
    local_blocks,
    min_blocks,
    max_blocks,
    tau,
    MODE: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    head = tl.program_id(0)
    row = tl.program_id(1)
    j = tl.arange(0, BLOCK_W)
    in_row = j < width
    i = tl.load(query_block_ptr + row)
    causal = in_row & (j <= i)
    forced = causal & ((j < sink_blocks) | (j > i - local_blocks))
    free = causal & ~forced
    num_forced = tl.sum(forced.to(tl.int32))
    num_free = tl.minimum(i + 1, width) - num_forced
    mass = tl.load(mass_ptr + head * stride_mh + row * stride_mr + j, mask=in_row, other=0.0)
    # Non-free blocks rank below every free one (mass >= 0).
    ranked = tl.sort(tl.where(free, mass, -1.0), descending=True)

    if MODE == 0:  # top-p: free blocks while the mass before them is below tau
        forced_mass = tl.sum(tl.where(forced, mass, 0.0))
        kept = tl.maximum(ranked, 0.0)
        before = forced_mass + tl.cumsum(kept, 0) - kept
        wanted = tl.sum((before < tau).to(tl.int32))
    elif MODE == 1:  # top-k: the row's total (computed in float64 by the caller)
        wanted = tl.load(row_total_ptr + row) - num_forced
    else:
        wanted = num_free
    lower = tl.maximum(min_blocks - num_forced, 0)
    upper = num_free
    if max_blocks >= 0:
        upper = tl.minimum(upper, tl.maximum(max_blocks - num_forced, 0))
    wanted = tl.minimum(tl.maximum(wanted, lower), upper)
    if tl.load(dense_ptr + row) != 0:
        wanted = num_free

    # The cut: the wanted-th largest free mass (none when nothing is wanted); equal masses
    # go by ascending block index, as in the reference's stable sort.
    cut = tl.where(wanted > 0, tl.sum(tl.where(j == wanted - 1, ranked, 0.0)), float("inf"))
    above = free & (mass > cut)
    at_cut = free & (mass == cut)
    tie_rank = tl.cumsum(at_cut.to(tl.int32), 0) - 1
    room = wanted - tl.sum(above.to(tl.int32))
    chosen = forced | above | (at_cut & (tie_rank < room))

    count = tl.sum(chosen.to(tl.int32))
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
    out = indices_ptr + head * stride_ih + row * stride_ir
    tl.store(out + j, tl.full([BLOCK_W], -1, tl.int32), mask=in_row & (j >= count))
    tl.store(out + slot, j.to(tl.int32), mask=chosen)
    tl.store(counts_ptr + head * stride_ch + row, count)


def row_tile(width: int) -> int:
    """The selection kernel's row tile for rows of ``width`` key blocks (compile-time: one
    kernel variant per value)."""
    return max(16, triton.next_power_of_2(width))


def select_blocks(
    mass: Tensor, query_block: Tensor, budget: LayerBudget, dense_rows: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Same contract as ``core.select_blocks``."""
    heads, rows, width = mass.shape
    device = mass.device
    counts = torch.empty(heads, rows, dtype=torch.int32, device=device)
    indices = torch.empty(heads, rows, width, dtype=torch.int32, device=device)
    if rows == 0 or heads == 0:
        return counts, indices
    query_block = query_block.to(device=device, dtype=torch.int32).contiguous()
    if budget.dense or (budget.mode == "top_p" and budget.tau >= 1.0):
        mode = _ALL  # tau = 1 is every causal block, whatever a float cumsum says
    else:
        mode = _TOP_P if budget.mode == "top_p" else _TOP_K
    row_total = query_block  # read by top-k only
    if mode == _TOP_K:
        num_causal = (query_block.to(torch.float64) + 1).clamp(max=width)
        row_total = torch.ceil(num_causal * budget.density).to(torch.int32)
    dense = (
        torch.zeros(rows, dtype=torch.int8, device=device)
        if dense_rows is None
        else dense_rows.to(device=device, dtype=torch.int8)
    )
    mass = mass.float().contiguous()
    _select_kernel[(heads, rows)](
        mass,
        query_block,
        row_total,
        dense,
        counts,
        indices,
        mass.stride(0),
        mass.stride(1),
        counts.stride(0),
        indices.stride(0),
        indices.stride(1),
        width,
        budget.sink_blocks,
        budget.local_blocks,
        budget.min_blocks,
        -1 if budget.max_blocks is None else budget.max_blocks,
        budget.tau,
        MODE=mode,
        BLOCK_W=row_tile(width),
        num_warps=4,
    )
    return counts, indices
