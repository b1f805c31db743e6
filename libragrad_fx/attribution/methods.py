"""The gradient methods (DESIGN §4): one formula each, computed from one pass.

Each method says what it reads (``Needs``) and maps a ``Pass`` to a token map and a remainder.
The vanilla and the LibraGrad form differ only in the graph the pass ran on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .engine import Needs, Pass
from .tokens import Layout

Compute = Callable[[Pass, Layout, int], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Method:
    name: str
    needs: Callable[[int], Needs]  # from the number of blocks
    compute: Compute  # (pass, layout, blocks) -> (token_map (B, T), remainder (B,))
    summary: str


def _io(p: Pass, layer: int) -> Tensor:
    return (p.h[layer] * p.g[layer]).sum(-1)


def site_sum(p: Pass, layout: Layout, weight: Callable[[int], float]) -> tuple[Tensor, Tensor]:
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


def _zero(p: Pass) -> Tensor:
    return p.score.new_zeros(p.score.shape[0])


def _gradient(p: Pass, layout: Layout, n: int):
    return p.g[0].abs().amax(-1), _zero(p)


def _input_x_gradient(p: Pass, layout: Layout, n: int):
    return _io(p, 0), _zero(p)


def _fullgrad(p: Pass, layout: Layout, n: int):
    tokens, rest = site_sum(p, layout, lambda last: 1.0 if last >= 0 else 0.0)
    return _io(p, 0) + tokens, rest


def _fullgrad_plus(p: Pass, layout: Layout, n: int):
    # mean over l of [h_l·g_l + Σ_{s after block l} BiasMap_s]: site s is in the terms l <= last
    tokens, rest = site_sum(p, layout, lambda last: (last + 1) / n)
    inputs = sum(_io(p, layer) for layer in range(n)) / n
    return inputs + tokens, rest


def _hirescam(p: Pass, layout: Layout, n: int):
    return _io(p, n - 1), _zero(p)


def _gradcam(p: Pass, layout: Layout, n: int):
    h, g = p.h[n - 1], p.g[n - 1]
    weights = g.mean(1, keepdim=True)
    return (weights * h).sum(-1), _zero(p)


def _xgradcam_plus(p: Pass, layout: Layout, n: int):
    h, g = p.h[n - 1].abs(), p.g[n - 1]
    weights = (g * h).sum(1, keepdim=True) / h.sum(1, keepdim=True).clamp_min(1e-12)
    return (weights * h).sum(-1), _zero(p)


def _layercam(p: Pass, layout: Layout, n: int):
    h, g = p.h[n - 1], p.g[n - 1]
    return (g.clamp_min(0) * h).sum(-1).clamp_min(0), _zero(p)


def _first(n: int) -> Needs:
    return Needs(blocks=(0,))


def _last(n: int) -> Needs:
    return Needs(blocks=(n - 1,))


GRADIENT_METHODS = {
    m.name: m for m in (
        Method("gradient", _first, _gradient, "max over channels of |df/dh_0|"),
        Method("input_x_gradient", _first, _input_x_gradient, "Σ_c h_0 ⊙ df/dh_0"),
        Method("fullgrad", lambda n: Needs(blocks=(0,), sites=True), _fullgrad,
               "h_0 ⊙ g_0 + the bias maps after block 0"),
        Method("fullgrad+", lambda n: Needs(blocks=tuple(range(n)), sites=True),
               _fullgrad_plus, "mean over blocks l of FullGrad_l"),
        Method("hirescam", _last, _hirescam, "Σ_c h_{L-1} ⊙ g_{L-1}"),
        Method("gradcam", _last, _gradcam, "Σ_c mean_t(g_{L-1}) h_{L-1}, no ReLU"),
        Method("xgradcam+", _last, _xgradcam_plus, "XGradCAM weights on |h_{L-1}|"),
        Method("layercam", _last, _layercam, "ReLU(Σ_c ReLU(g_{L-1}) h_{L-1})"),
    )
}
