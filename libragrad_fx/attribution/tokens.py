"""The token layout: which axis of a value is the batch and which the tokens, which tokens are
patches (in raster order on a gh x gw grid) and which are prefix tokens, and which one, if
any, the output reads as the class token.

It is measured, not assumed: the graph is run twice with no gradient on small batches of
different sizes (the axis whose size follows the batch is the batch axis) and different
pixels (the tokens of the first block's input that do not change are the prefix tokens).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import torch
import torch.fx as fx
from torch import Tensor

from ..compiler.dataflow import Dataflow
from ..compiler.graph_utils import is_call, module_path
from ..errors import LibraError
from .structure import Structure


class _Shapes(fx.Interpreter):
    """Records the shape of every tensor value, and the value of the nodes in ``keep``."""

    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node]):
        super().__init__(gm)
        self.keep, self.shapes, self.kept = keep, {}, {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if isinstance(value, Tensor):
            self.shapes[n] = tuple(value.shape)
            if n in self.keep:
                self.kept[n] = value
        return value


@dataclass(frozen=True)
class Axes:
    """Where a value keeps its batch and its tokens (``tokens``), or its patch grid (``grid``,
    the first of two consecutive axes). Neither: the value belongs to no token. A batch folded
    with another axis, (B·k, ...), has ``fold = k``; the other indices then count the value
    unfolded to (B, k, ...)."""

    batch: int
    tokens: int | None = None
    grid: int | None = None
    fold: int = 1

    def spare_last(self, ndim: int) -> bool:
        """True when the last axis of an ``ndim``-D value is a channel axis (neither batch,
        tokens nor grid), so summing it early changes no token's total."""
        last = ndim - 1
        grid = () if self.grid is None else (self.grid, self.grid + 1)
        return self.fold == 1 and last not in (self.batch, self.tokens, *grid)

    def unfold(self, value: Tensor) -> Tensor:
        """The value with its batch first (and unfolded)."""
        if self.fold > 1:
            value = value.unflatten(self.batch, (-1, self.fold))
        return value.movedim(self.batch, 0)


@dataclass(frozen=True)
class Layout:
    tokens: int  # T, every token of the first block's input
    order: tuple[int, ...]  # model positions, prefix tokens first, then the patches
    prefix: int
    grid: tuple[int, int]
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
        value = ax.unfold(value)
        if ax.tokens is not None:
            axis = ax.tokens + (ax.tokens < ax.batch)
            other = [d for d in range(1, value.dim()) if d != axis]
            per_token = value.sum(other) if other else value
            return self.reorder(per_token)
        if ax.grid is not None:
            axis = ax.grid + (ax.grid < ax.batch)
            value = value.movedim((axis, axis + 1), (1, 2)).flatten(1, 2)
            patches = value.sum(list(range(2, value.dim()))) if value.dim() > 2 else value
            head = patches.new_zeros(patches.shape[0], self.prefix)
            return torch.cat([head, patches], dim=1)
        return None

    def unassigned(self, node: fx.Node, value: Tensor) -> Tensor:
        """A value of ``node`` with no token axis, summed to (B,)."""
        value = self.axes[node].unfold(value)
        return value.reshape(value.shape[0], -1).sum(1)


def _batch_axis(one: tuple, two: tuple) -> tuple[int, int] | None:
    """(axis, fold): the one axis whose size doubles with the batch, and its size at batch 1."""
    if len(one) != len(two):
        return None
    moved = [i for i, (a, b) in enumerate(zip(one, two, strict=True)) if a != b]
    if len(moved) != 1 or two[moved[0]] != 2 * one[moved[0]]:
        return None
    return moved[0], one[moved[0]]


def _grid(structure: Structure, flow: Dataflow, batch_axes: dict, shapes: dict,
          tokens: int) -> tuple[int, int]:
    """The patch grid: the latest 4-D value before the first block whose two spatial axes
    hold at most ``tokens`` positions."""
    before = nx.ancestors(flow.graph, structure.inputs[0])
    order = {n: i for i, n in enumerate(structure.inputs[0].graph.nodes)}
    for node in sorted(before, key=order.get, reverse=True):
        shape, found = shapes.get(node), batch_axes.get(node)
        if shape is None or len(shape) != 4 or found is None or found[1] != 1:
            continue
        axis = found[0]
        rest = [s for i, s in enumerate(shape) if i != axis]
        for gh, gw in ((rest[1], rest[2]), (rest[0], rest[1])):
            if gh * gw <= tokens:
                return gh, gw
    side = int(round(tokens ** 0.5))
    if side * side == tokens:
        return side, side
    raise LibraError("cannot find the patch grid of the first block's input; token-level maps "
                     "need a model that embeds an image as a grid of patch tokens")


def _class_token(structure: Structure, flow: Dataflow, axes: dict[fx.Node, Axes],
                 constant: list[int], tokens: int) -> int | None:
    """The prefix token the output reads by index after the last block (``x[:, 0]``)."""
    after = nx.descendants(flow.graph, structure.output) | {structure.output}
    for node in after:
        if not is_call(node, operator.getitem) or not isinstance(node.args[1], tuple):
            continue
        source = axes.get(node.args[0])
        if source is None or source.tokens is None or source.fold > 1:
            continue
        index = node.args[1]
        if len(index) > source.tokens and isinstance(index[source.tokens], int):
            position = index[source.tokens] % tokens
            if position in constant:
                return position
    return None


def measure_layout(gm: fx.GraphModule, structure: Structure, x: Tensor) -> Layout:
    """Run ``gm`` on two small probe batches and read off the layout (see the module doc)."""
    flow = Dataflow.of(gm)
    h0 = structure.inputs[0]
    first = x[:1].detach()
    pair = torch.cat([first * 0.5 + 0.25, -first])
    runs = []
    with torch.no_grad():
        for batch in (first, pair):
            recorder = _Shapes(gm, {h0})
            recorder.run(batch)
            runs.append(recorder)
    one, two = runs
    batch_axes = {n: _batch_axis(one.shapes[n], two.shapes[n])
                  for n in one.shapes if n in two.shapes}
    shape, found = one.shapes[h0], batch_axes.get(h0)
    axis = found[0] if found is not None and found[1] == 1 else None
    if len(shape) != 3 or axis is None:
        raise LibraError(f"the first block's input has shape {shape}; token-level maps need a "
                         "residual stream of shape (batch, tokens, channels)")
    token_axis = [i for i in range(2) if i != axis][0]
    tokens = shape[token_axis]
    a = one.kept[h0].movedim(axis, 0)[0]
    b = two.kept[h0].movedim(axis, 0)
    same = ((b[0] == a) & (b[1] == a)).movedim(token_axis - (token_axis > axis), 0)
    constant = [t for t in range(tokens) if bool(same[t].all())]
    patches = [t for t in range(tokens) if t not in constant]
    grid = _grid(structure, flow, batch_axes, one.shapes, tokens)
    if grid[0] * grid[1] != len(patches):
        raise LibraError(f"the first block's input has {len(patches)} tokens that depend on "
                         f"the pixels, which is not the {grid[0]}x{grid[1]} patch grid found")
    axes = {}
    for node, found in batch_axes.items():
        if found is None:
            continue
        bax, fold = found
        sizes = one.shapes[node]
        if fold > 1:
            sizes = (*sizes[:bax], 1, fold, *sizes[bax + 1:])
        dims = [i for i in range(len(sizes)) if i != bax]
        tok = next((i for i in dims if sizes[i] == tokens), None)
        grd = next((i for i in dims if i + 1 in dims and (sizes[i], sizes[i + 1]) == grid), None)
        axes[node] = Axes(bax, tok, None if tok is not None else grd, fold)
    order = tuple(constant + patches)
    cls = _class_token(structure, flow, axes, constant, tokens)
    return Layout(tokens, order, len(constant), grid,
                  None if cls is None else order.index(cls), axes)
