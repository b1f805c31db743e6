"""Between tokens and pixels: spreading a token map over its patches, and pooling a pixel map
back to tokens, both preserving the total (what has no place goes to the remainder)."""

from __future__ import annotations

from torch import Tensor

from ..errors import LibraError
from .tokens import Layout


def _grid(layout: Layout) -> tuple[int, int]:
    if layout.grid is None:
        raise LibraError("level='pixel' needs an image: this model's input is a sequence with "
                         "no grid (a map per token); use level='token'")
    return layout.grid


def spread(tokens: Tensor, layout: Layout, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(B, T) -> (B, H, W), each patch's value shared evenly by its pixels; the prefix tokens'
    values are returned as the remainder (B,)."""
    gh, gw = _grid(layout)
    height, width = size
    ph, pw = height // gh, width // gw
    patches = tokens[:, layout.prefix:].reshape(-1, gh, gw) / (ph * pw)
    pixels = tokens.new_zeros(tokens.shape[0], height, width)
    pixels[:, :gh * ph, :gw * pw] = patches.repeat_interleave(ph, 1).repeat_interleave(pw, 2)
    return pixels, tokens[:, :layout.prefix].sum(-1)


def pool(pixels: Tensor, layout: Layout) -> tuple[Tensor, Tensor]:
    """(B, H, W) -> (B, T), each patch the sum of its pixels and the prefix tokens zero; pixels
    outside the patch grid are returned as the remainder (B,)."""
    gh, gw = _grid(layout)
    batch, height, width = pixels.shape
    ph, pw = height // gh, width // gw
    inside = pixels[:, :gh * ph, :gw * pw]
    patches = inside.reshape(batch, gh, ph, gw, pw).sum((2, 4)).reshape(batch, -1)
    tokens = pixels.new_zeros(batch, layout.tokens)
    tokens[:, layout.prefix:] = patches
    return tokens, pixels.sum((1, 2)) - inside.sum((1, 2))
