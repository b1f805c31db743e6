"""The token layout: which axis of a value is the batch and which the tokens (or the grid),
which tokens are patches (in raster order on a gh x gw grid) and which are prefix tokens, and
which one, if any, the output reads as the class token.

Three kinds of residual stream: tokens (B, T, C), as in a ViT or a text model (where the input
is not an image, there is no grid: a map per token); and a spatial grid (B, H, W, C) or
(B, C, H, W), as in Swin, ConvNeXt, MaxViT, whose later stages may be on coarser grids (put on
the first block's grid by ``grid.regrid``). It is measured, not assumed: the graph is run twice
with no gradient on small batches of different sizes (the axis whose size follows the batch is
the batch axis) and different inputs (the tokens of the first block's input that do not change
are the prefix tokens).
"""

from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx
from torch import Tensor

from ..compiler.dataflow import Dataflow
from ..compiler.graph_utils import is_call
from ..errors import LibraError
from .grid import flat_cells, grid_axes
from .layout import Axes, Layout
from .structure import Structure

__all__ = ["Axes", "Layout", "measure_layout"]


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
    if axis is None or len(shape) not in (3, 4):
        raise LibraError(f"the first block's input has shape {shape}; maps need a residual "
                         "stream of shape (batch, tokens, channels), (batch, height, width, "
                         "channels) or (batch, channels, height, width)")
    if len(shape) == 4:
        return _spatial(shape, axis, batch_axes, one.shapes, x)
    token_axis = [i for i in range(2) if i != axis][0]
    tokens = shape[token_axis]
    a = one.kept[h0].movedim(axis, 0)[0]
    b = two.kept[h0].movedim(axis, 0)
    same = ((b[0] == a) & (b[1] == a)).movedim(token_axis - (token_axis > axis), 0)
    constant = [t for t in range(tokens) if bool(same[t].all())]
    patches = [t for t in range(tokens) if t not in constant]
    grid = _grid(structure, flow, batch_axes, one.shapes, tokens) if x.dim() == 4 else None
    if grid is not None and grid[0] * grid[1] != len(patches):
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
        grd = next((i for i in dims if i + 1 in dims and (sizes[i], sizes[i + 1]) == grid),
                   None) if grid is not None and tok is None else None
        flat = None
        if grid is not None and tok is None and grd is None and fold == 1 and not constant \
                and len(sizes) >= 3:  # a later stage of a hierarchical token model
            flat = next(((i, c) for i in dims if (c := flat_cells(sizes[i], grid))), None)
        if flat is not None:
            axes[node] = Axes(bax, None, flat[0], fold, flat[1], flat=True)
        else:
            axes[node] = Axes(bax, tok, grd, fold, None if grd is None else grid)
    order = tuple(constant + patches)
    cls = _class_token(structure, flow, axes, constant, tokens)
    return Layout(tokens, order, len(constant), grid,
                  None if cls is None else order.index(cls), axes)


def _spatial(shape: tuple, axis: int, batch_axes: dict, shapes: dict, x: Tensor) -> Layout:
    """A residual stream on a grid, (B, H, W, C) or (B, C, H, W): the first block's grid is
    the pair of its axes that tiles the image; every value with a batch axis and a pair of
    axes fitting that grid (finer, as a stem's, or coarser, as a later stage's) has its cells
    on it. No prefix tokens, no class token."""
    image = tuple(x.shape[-2:]) if x.dim() == 4 else None
    at = grid_axes(shape, axis, image) if image is not None else None
    if at is None:
        raise LibraError(f"the first block's input has shape {shape}, and no two of its axes "
                         "tile the input image; a spatial residual stream must be (batch, "
                         "height, width, channels) or (batch, channels, height, width)")
    grid = (shape[at], shape[at + 1])
    axes = {}
    for node, found in batch_axes.items():
        if found is None:
            continue
        bax, fold = found
        sizes = shapes[node]
        at = grid_axes(sizes, bax, grid) if fold == 1 else None
        axes[node] = Axes(bax, None, at, fold,
                          None if at is None else (sizes[at], sizes[at + 1]))
    tokens = grid[0] * grid[1]
    return Layout(tokens, tuple(range(tokens)), 0, grid, None, axes)
