"""The gradient methods' formulas (DESIGN §4), each computed from one forward-backward run.

Each formula maps a ``Readout`` to a map and a remainder; the registry pairs it with what the
run must read. The vanilla and the LibraGrad form differ only in the graph the run used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from .engine import Needs, Readout
from .one_pass import OnePass
from .pixels import spread
from .tokens import Layout


def on_tokens(p: Readout, layer: int, per_position: Tensor) -> Tensor:
    """(B, N_l) at block ``layer``'s positions -> (B, T): a later stage's coarser grid is
    spread evenly over the first block's grid, the total kept (``grid.regrid``)."""
    return p.layout.on_tokens(p.nodes[layer], per_position)


def block_io(p: Readout, layer: int) -> Tensor:
    """Σ_c h_l ⊙ g_l, (B, T): block ``layer``'s input times its gradient."""
    return on_tokens(p, layer, (p.h[layer] * p.g[layer]).sum(-1))


def site_sum(p: Readout, layout: Layout, weight: Callable[[int], float]) -> tuple[Tensor, Tensor]:
    """Σ_s weight(last block of s) · BiasMap_s, on the tokens, and what has no token.

    What has no token goes to the class token where the model has one, else the remainder.
    """
    tokens = p.score.new_zeros(p.score.shape[0], layout.tokens)
    rest = p.score.new_zeros(p.score.shape[0])
    for last, per_token, unassigned in p.site_tokens:
        w = weight(last)
        if w == 0:
            continue
        if per_token is not None:
            tokens = tokens + w * per_token
        rest = rest + w * unassigned
    if layout.cls is not None:
        tokens[:, layout.cls] += rest
        rest = torch.zeros_like(rest)
    return tokens, rest


def zero(p: Readout) -> Tensor:
    """A zero remainder (B,), for the methods that assign everything to tokens."""
    return p.score.new_zeros(p.score.shape[0])


def first_block(n: int) -> Needs:
    return Needs(blocks=(0,))


def last_block(n: int) -> Needs:
    return Needs(blocks=(n - 1,))


def input_grad(n: int) -> Needs:
    return Needs(input_grad=True)


def gradient(p: Readout, layout: Layout, n: int) -> tuple[Tensor, Tensor]:
    return on_tokens(p, 0, p.g[0].abs().amax(-1)), zero(p)


def gradient_pixels(p: Readout, x: Tensor, layout: Layout, n: int) -> tuple[Tensor, Tensor]:
    return p.input_grad.abs().amax(1), zero(p)


def input_x_gradient(p: Readout, layout: Layout, n: int) -> tuple[Tensor, Tensor]:
    return block_io(p, 0), zero(p)


def input_x_gradient_pixels(p: Readout, x: Tensor, layout: Layout,
                            n: int) -> tuple[Tensor, Tensor]:
    return (x * p.input_grad).sum(1), zero(p)


@dataclass(frozen=True)
class FullGrad:
    """The mean over terms l of FullGrad_l = Σ_c h_l⊙g_l + Σ_{s after block l} BiasMap_s.

    The term l = -1 (pixel level) is x⊙∂f/∂x with every bias map, each spread over its patch.
    FullGrad is one term: l = 0 for tokens, l = -1 for pixels; FullGrad+ has every block, and
    at pixel level l = -1 too. A bias site after block ``last`` is in the terms l <= last, so
    its weight is their share. Each term is complete under LibraGrad, so the mean is.
    """

    every_block: bool

    def terms(self, blocks: int, pixel: bool) -> tuple[int, ...]:
        image = (-1,) if pixel else ()
        if self.every_block:
            return image + tuple(range(blocks))
        return image or (0,)  # FullGrad's pixel term takes block 0's place

    def _needs(self, blocks: int, pixel: bool) -> Needs:
        terms = self.terms(blocks, pixel)
        return Needs(blocks=tuple(t for t in terms if t >= 0), sites=True, input_grad=pixel)

    def _tokens(self, p: Readout, layout: Layout, terms: tuple[int, ...]
                ) -> tuple[Tensor, Tensor]:
        tokens, rest = site_sum(p, layout,
                                lambda last: sum(1 for t in terms if t <= last) / len(terms))
        inputs = sum(block_io(p, t) for t in terms if t >= 0) / len(terms)
        return inputs + tokens, rest

    def token_map(self, p: Readout, layout: Layout, n: int) -> tuple[Tensor, Tensor]:
        return self._tokens(p, layout, self.terms(n, pixel=False))

    def pixel_map(self, p: Readout, x: Tensor, layout: Layout, n: int) -> tuple[Tensor, Tensor]:
        terms = self.terms(n, pixel=True)
        tokens, rest = self._tokens(p, layout, terms)
        spread_pixels, prefix = spread(tokens, layout, tuple(x.shape[-2:]))
        image, _ = input_x_gradient_pixels(p, x, layout, n)
        return image / len(terms) + spread_pixels, rest + prefix

    @property
    def token(self) -> OnePass:
        return OnePass(lambda n: self._needs(n, pixel=False), self.token_map)

    @property
    def pixel(self) -> OnePass:
        return OnePass(lambda n: self._needs(n, pixel=True), self.pixel_map)


def hirescam(p: Readout, layout: Layout, n: int) -> tuple[Tensor, Tensor]:
    return block_io(p, n - 1), zero(p)


def _cam_tokens(h: Tensor, g: Tensor, layout: Layout, tokens: str) -> tuple[Tensor, Tensor]:
    """h and g over the tokens the CAM weights read: every token (DESIGN.md's form) or the
    patch tokens only (pytorch-grad-cam's, whose ViT reshape drops the prefix tokens); the
    prefix tokens' rows are zeros in the latter, so their map entries are 0."""
    if tokens == "all":
        return h, g
    if tokens != "patches":
        raise InputError(f"tokens must be 'all' or 'patches', got {tokens!r}")
    if layout.prefix == 0 or h.shape[1] != layout.tokens:  # no prefix tokens: the same
        return h, g
    keep = torch.ones(h.shape[1], dtype=h.dtype, device=h.device)
    keep[:layout.prefix] = 0
    return h * keep[:, None], g * keep[:, None]


def gradcam(p: Readout, layout: Layout, n: int, tokens: str = "all") -> tuple[Tensor, Tensor]:
    h, g = _cam_tokens(p.h[n - 1], p.g[n - 1], layout, tokens)
    prefix = layout.prefix if h.shape[1] == layout.tokens else 0
    count = h.shape[1] - (prefix if tokens == "patches" else 0)
    weights = g.sum(1, keepdim=True) / count
    return on_tokens(p, n - 1, (weights * h).sum(-1)), zero(p)


def xgradcam_plus(p: Readout, layout: Layout, n: int, tokens: str = "all"
                  ) -> tuple[Tensor, Tensor]:
    h, g = _cam_tokens(p.h[n - 1], p.g[n - 1], layout, tokens)
    h = h.abs()
    weights = (g * h).sum(1, keepdim=True) / h.sum(1, keepdim=True).clamp_min(1e-12)
    return on_tokens(p, n - 1, (weights * h).sum(-1)), zero(p)


def layercam(p: Readout, layout: Layout, n: int) -> tuple[Tensor, Tensor]:
    h, g = p.h[n - 1], p.g[n - 1]
    return on_tokens(p, n - 1, (g.clamp_min(0) * h).sum(-1).clamp_min(0)), zero(p)
