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

from .engine import CompiledModel


class TokenStream:
    """h_0 of images shaped like ``x``, (B, T, ...) with the tokens in the model's order.

    ``grid`` (gh, gw), ``prefix`` (how many prefix tokens), ``tokens`` (T) and
    ``patch_positions`` (the model position of each patch, in raster order) say where the
    patches are in that order.
    """

    def __init__(self, compiled: CompiledModel, x: Tensor):
        self._node = compiled.structure.inputs[0]
        layout = compiled.layout(x)
        axes = layout.axes[self._node]
        self._batch, self._tokens = axes.batch, axes.tokens + (axes.tokens < axes.batch)
        self.grid: tuple[int, int] = tuple(layout.grid)
        self.prefix: int = layout.prefix
        self.tokens: int = layout.tokens
        self.patch_positions: tuple[int, ...] = tuple(layout.order[layout.prefix:])
        self._head = compiled.probe((self._node,))
        self._tail = compiled.probe((), start=self._node)

    def first_input(self, images: Tensor) -> tuple[Any, Tensor]:
        """The model's output on ``images`` and their h_0, computed without gradient."""
        with torch.no_grad():
            output, values = self._head(images)
        return output, values[self._node].movedim(self._batch, 0).movedim(self._tokens, 1)

    def tail(self, images: Tensor, h0: Tensor) -> Any:
        """The model's output when its first block gets ``h0`` (N, T', ...) in place of the
        h_0 of ``images`` (N, ...): what the graph reads of the images after h_0 comes from
        them. T' may be shorter than T where the graph allows it."""
        stream = h0.movedim(1, self._tokens).movedim(0, self._batch)
        return self._tail(images, stream)[0]
