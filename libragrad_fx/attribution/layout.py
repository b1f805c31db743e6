"""Axes and Layout: where a value keeps its batch and its tokens or grid cells, and how a value
is put on the map's tokens (see ``tokens`` for how they are measured)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.fx as fx
from torch import Tensor

from ..compiler.graph_utils import module_path
from ..errors import LibraError
from .grid import regrid


@dataclass(frozen=True)
class Axes:
    """Where a value keeps its batch and its tokens (``tokens``), or its patch grid (``grid``,
    the first of two consecutive axes, of sizes ``cells``: the first block's grid or a coarser
    or finer one; with ``flat``, one axis of h·w cells in raster order, as a hierarchical
    token model's later stage). Neither: the value belongs to no token. A batch folded with
    another axis, (B·k, ...), has ``fold = k``; the other indices then count the value
    unfolded to (B, k, ...)."""

    batch: int
    tokens: int | None = None
    grid: int | None = None
    fold: int = 1
    cells: tuple[int, int] | None = None
    flat: bool = False

    def spare_last(self, ndim: int) -> bool:
        """True when the last axis of an ``ndim``-D value is a channel axis (neither batch,
        tokens nor grid), so summing it early changes no token's total."""
        last = ndim - 1
        grid = () if self.grid is None else (self.grid,) if self.flat else (
            self.grid, self.grid + 1)
        return self.fold == 1 and last not in (self.batch, self.tokens, *grid)

    def unfold(self, value: Tensor) -> Tensor:
        """The value with its batch first (and unfolded)."""
        if self.fold > 1:
            value = value.unflatten(self.batch, (-1, self.fold))
        return value.movedim(self.batch, 0)

    def cells_first(self, value: Tensor) -> Tensor:
        """A value with a grid, batch first, as (B, h, w, ...)."""
        if self.grid is None:
            raise LibraError("a block input with neither a token axis nor a grid")
        value = self.unfold(value)
        axis = self.grid + (self.grid < self.batch)
        if self.flat:
            return value.movedim(axis, 1).unflatten(1, self.cells)
        return value.movedim((axis, axis + 1), (1, 2))


@dataclass(frozen=True)
class Layout:
    """Where the map's positions are: T tokens, prefix tokens first, then the patches in raster
    order on ``grid`` (None for a sequence with no grid, as text)."""

    tokens: int  # T, every token (or grid cell) of the first block's input
    order: tuple[int, ...]  # model positions, prefix tokens first, then the patches
    prefix: int
    grid: tuple[int, int] | None
    cls: int | None  # the class token's index in ``order``
    axes: dict[fx.Node, Axes]

    @cached_property
    def _in_model_order(self) -> bool:
        return self.order == tuple(range(len(self.order)))

    def reorder(self, value: Tensor, dim: int = 1) -> Tensor:
        """``value``'s token axis ``dim`` (model positions) in our order; a view when the
        model already puts the prefix first, which saves a copy of every tapped activation."""
        if self._in_model_order:
            return value
        return value.index_select(dim, torch.tensor(self.order, device=value.device))

    def to_tokens(self, node: fx.Node, value: Tensor) -> Tensor | None:
        """``value`` (shaped like ``node``'s output) summed to (B, T) in our token order, or
        None when the node has no token axis."""
        ax = self.axes.get(node)
        if ax is None:
            raise LibraError(f"cannot tell which axis of {node.name} (in "
                             f"{module_path(node) or '<root>'}) is the batch (no one axis grows "
                             "with the batch size), so its contribution cannot be put on "
                             "tokens")
        if ax.tokens is not None:
            value = ax.unfold(value)
            axis = ax.tokens + (ax.tokens < ax.batch)
            other = [d for d in range(1, value.dim()) if d != axis]
            per_token = value.sum(other) if other else value
            return self.reorder(per_token)
        if ax.grid is not None:
            cells = ax.cells_first(value)
            cells = cells.sum(list(range(3, cells.dim()))) if cells.dim() > 3 else cells
            return self.place(regrid(cells, self.grid).flatten(1))
        return None

    def place(self, patches: Tensor) -> Tensor:
        """(B, gh·gw) patch values -> (B, T), the prefix tokens zero."""
        if self.prefix == 0:
            return patches
        return torch.cat([patches.new_zeros(patches.shape[0], self.prefix), patches], dim=1)

    def positions(self, node: fx.Node, value: Tensor) -> Tensor:
        """A block input (or its gradient) as (B, N, C): its N positions (tokens in our
        order, or grid cells in raster order) by its channels."""
        ax = self.axes[node]
        if ax.tokens is not None:
            value = ax.unfold(value)
            value = self.reorder(value.movedim(ax.tokens + (ax.tokens < ax.batch), 1))
            return value.flatten(2) if value.dim() > 2 else value[..., None]
        value = ax.cells_first(value).flatten(1, 2)
        return value.flatten(2) if value.dim() > 2 else value[..., None]

    def on_tokens(self, node: fx.Node, per_position: Tensor) -> Tensor:
        """(B, N) values at a block input's positions (as ``positions`` orders them) -> (B, T):
        a coarser grid's cells spread evenly over the first grid's, the total kept."""
        ax = self.axes[node]
        if ax.tokens is not None:
            return per_position
        cells = per_position.reshape(-1, *ax.cells)
        return self.place(regrid(cells, self.grid).flatten(1))

    def unassigned(self, node: fx.Node, value: Tensor) -> Tensor:
        """A value of ``node`` with no token axis, summed to (B,)."""
        value = self.axes[node].unfold(value)
        return value.reshape(value.shape[0], -1).sum(1)
