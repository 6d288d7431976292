"""Block selection (ALGORITHM.md section 4), vectorised over heads and rows, no host sync.

One row = one (request, query block). Everything is a tensor op, so the same function is
the reference on the CPU and runs as is on the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import LayerBudget


def select_blocks(
    mass: Tensor, query_block: Tensor, budget: LayerBudget, dense_rows: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Pick key blocks per (head, row).

    ``mass [H, rows, W]``: estimated block mass, zero past a row's causal blocks;
    ``query_block [rows]``: absolute query block index ``i`` (key blocks ``0..i`` are causal);
    ``dense_rows [rows]``: rows that take every causal block.
    Returns ``counts [H, rows]`` (int32) and ``indices [H, rows, W]`` (int32, ascending in
    the first ``counts`` entries, -1 after).
    """
    heads, rows, width = mass.shape
    device = mass.device
    j = torch.arange(width, device=device)
    i = query_block.to(device=device, dtype=torch.long)[:, None]
    causal = j[None, :] <= i
    forced = causal & ((j[None, :] < budget.sink_blocks) | (j[None, :] > i - budget.local_blocks))
    num_causal = (i[:, 0] + 1).clamp(max=width)
    num_forced = forced.sum(dim=1)

    free = causal & ~forced
    num_free = num_causal - num_forced
    # Non-free blocks rank below every free one (mass >= 0).
    ranked, order = mass.masked_fill(~free[None], -1.0).sort(dim=2, descending=True, stable=True)

    if budget.dense or (budget.mode == "top_p" and budget.tau >= 1.0):
        # tau = 1 means every causal block: a float cumsum may reach 1.0 early and drop
        # blocks of tiny mass, which would break the "tau = 1 is dense" invariant.
        wanted_free = num_free.expand(heads, rows)
    elif budget.mode == "topk":
        total = torch.ceil(num_causal.to(torch.float64) * budget.density).long()
        wanted_free = (total - num_forced).expand(heads, rows)
    else:
        forced_mass = (mass * forced[None]).sum(dim=2, keepdim=True)
        ranked = ranked.clamp(min=0)
        mass_before = forced_mass + ranked.cumsum(dim=2) - ranked
        wanted_free = (mass_before < budget.tau).sum(dim=2)

    lower = (budget.min_blocks - num_forced).clamp(min=0)
    upper = num_free
    if budget.max_blocks is not None:
        upper = torch.minimum(upper, (budget.max_blocks - num_forced).clamp(min=0))
    wanted_free = torch.minimum(torch.maximum(wanted_free, lower[None]), upper[None])
    if dense_rows is not None:
        wanted_free = torch.where(dense_rows[None].to(device), num_free[None], wanted_free)

    # Take the first wanted_free of the ranked free blocks, back in block order.
    taken = j.expand(heads, rows, width) < wanted_free[..., None]
    chosen = torch.zeros_like(taken).scatter_(2, order, taken) & free[None]
    chosen |= forced[None]
    counts = chosen.sum(dim=2)
    # Compact the chosen block indices to the front, ascending: chosen block j goes to slot
    # (chosen blocks before it); the others go to a spill slot that is cut off.
    slot = torch.where(chosen, chosen.cumsum(dim=2) - 1, width)
    indices = torch.full((heads, rows, width + 1), -1, dtype=torch.int32, device=device)
    indices.scatter_(2, slot, j.to(torch.int32).expand(heads, rows, width).contiguous())
    return counts.to(torch.int32), indices[..., :width].contiguous()
