"""TokenStream: the first block's input h_0 as a batch-major tensor, and the graph's tail run
from a given h_0.

Integrated gradients at token level and the token-removal metrics work on h_0 rather than on
the image; this is what they need from a compiled model, so neither reads its structure,
layout or probes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import LibraError
from .engine import CompiledModel


class TokenStream:
    """h_0 of images shaped like ``x``, (B, T, ...) with the tokens in the model's order.

    ``grid`` (gh, gw), ``prefix`` (how many prefix tokens), ``tokens`` (T) and
    ``patch_positions`` (the model position of each patch, in raster order) say where the
    patches are in that order.
    """

    def __init__(self, compiled: CompiledModel, x: Tensor, spatial: bool = False):
        self._node = compiled.structure.inputs[0]
        layout = compiled.layout(x)
        axes = layout.axes[self._node]
        if axes.tokens is None and not spatial:
            raise LibraError("removing tokens needs a residual stream of tokens (batch, "
                             "tokens, channels); this model's first block reads a grid "
                             "(batch, height, width, channels) or (batch, channels, height, "
                             "width): mask pixels instead (token_removal's mode='pixel')")
        self._layout, self._batch = layout, axes.batch
        self._tokens = None if axes.tokens is None else axes.tokens + (axes.tokens < axes.batch)
        self.grid: tuple[int, int] | None = layout.grid
        self.prefix: int = layout.prefix
        self.tokens: int = layout.tokens
        self.patch_positions: tuple[int, ...] = tuple(layout.order[layout.prefix:])
        self._head = compiled.probe((self._node,))
        self._tail = compiled.probe((), start=self._node)

    def first_input(self, images: Tensor) -> tuple[Any, Tensor]:
        """The model's output on ``images`` and their h_0, computed without gradient."""
        with torch.no_grad():
            output, values = self._head(images)
        value = values[self._node].movedim(self._batch, 0)
        return output, value if self._tokens is None else value.movedim(self._tokens, 1)

    def to_tokens(self, value: Tensor) -> Tensor:
        """A value shaped like ``first_input``'s h_0, summed per token to (B, T) in the
        layout's order (a grid's cells in raster order)."""
        if self._tokens is not None:
            value = value.movedim(1, self._tokens)
        return self._layout.to_tokens(self._node, value.movedim(0, self._batch))

    def tail(self, images: Tensor, h0: Tensor) -> Any:
        """The model's output when its first block gets ``h0`` (N, T', ...) in place of the
        h_0 of ``images`` (N, ...): what the graph reads of the images after h_0 comes from
        them. T' may be shorter than T where the graph allows it."""
        stream = h0 if self._tokens is None else h0.movedim(1, self._tokens)
        stream = stream.movedim(0, self._batch)
        return self._tail(images, stream)[0]
