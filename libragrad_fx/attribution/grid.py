"""Between grids: a per-cell map on one grid put on another, preserving its total.

A hierarchical model (Swin, ConvNeXt, MaxViT) keeps its residual stream on a grid that coarsens
from stage to stage; maps are given on the first block's grid. A coarser cell's value is spread
evenly over the fine cells it covers (each gets value / cells covered), a finer grid is summed
per coarse cell: both exact on the total, so a complete method stays complete.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import LibraError


def fits(size: tuple[int, int], grid: tuple[int, int]) -> bool:
    """Whether a (h, w) grid covers the same area as ``grid``, each cell of one an exact block
    of cells of the other (same aspect ratio, one side count a multiple of the other)."""
    (h, w), (gh, gw) = size, grid
    if h < 1 or w < 1 or h * gw != w * gh:
        return False
    return (gh % h == 0 and gw % w == 0) or (h % gh == 0 and w % gw == 0)


def regrid(cells: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, h, w) -> (B, gh, gw) with the same total per sample (see the module doc)."""
    h, w = cells.shape[-2:]
    gh, gw = grid
    if (h, w) == (gh, gw):
        return cells
    if not fits((h, w), grid):
        raise LibraError(f"a {h}x{w} grid cannot be put on the {gh}x{gw} grid of the first "
                         "block: neither is a whole multiple of the other")
    if gh % h == 0:
        sh, sw = gh // h, gw // w
        return (cells / (sh * sw)).repeat_interleave(sh, -2).repeat_interleave(sw, -1)
    sh, sw = h // gh, w // gw
    return cells.reshape(*cells.shape[:-2], gh, sh, gw, sw).sum((-3, -1))


def grid_axes(sizes: tuple[int, ...], skip: int, grid: tuple[int, int]) -> int | None:
    """The first of two consecutive axes (not ``skip``, the batch) that hold a grid fitting
    ``grid``; the trailing pair where two fit, as (C, H, W) with C = H = W is read NCHW."""
    found = None
    for i in range(len(sizes) - 1):
        if skip in (i, i + 1):
            continue
        if fits((sizes[i], sizes[i + 1]), grid):
            found = i
    return found


def flat_cells(count: int, grid: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) grid of ``count`` cells that fits ``grid`` (coarser or finer by a whole
    factor on both sides), if one does: how a flattened (B, h·w, C) stream is read."""
    gh, gw = grid
    for k in range(1, max(gh, gw) + 1):
        if gh % k == 0 and gw % k == 0 and (gh // k) * (gw // k) == count:
            return gh // k, gw // k
        if gh * k * gw * k == count:
            return gh * k, gw * k
    return None
