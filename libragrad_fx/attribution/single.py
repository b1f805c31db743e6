"""Single-pass methods: one forward-backward, then the method's formula (token or pixel level)."""

from __future__ import annotations

from torch import Tensor

from .attention_methods import ATTENTION_METHODS
from .engine import Form, Needs
from .explanation import Explanation
from .methods import GRADIENT_METHODS, site_sum
from .pixels import pool, spread
from .targets import Target

SINGLE_PASS = {**GRADIENT_METHODS, **ATTENTION_METHODS}


def finish(form: Form, x: Tensor, tokens: Tensor, rest: Tensor, score: Tensor, method: str,
            level: str, pixels: Tensor | None = None, baseline: Tensor | None = None
            ) -> Explanation:
    layout = form.layout(x)
    gh, gw = layout.grid
    patches = tokens[:, layout.prefix:].reshape(-1, gh, gw)
    return Explanation(tokens.detach(), patches.detach(), rest.detach(), score, baseline,
                       method, form.libra, level, layout.prefix,
                       None if pixels is None else pixels.detach())


def single(form: Form, x: Tensor, goal: Target, method: str, level: str,
            options: dict) -> Explanation:
    spec = SINGLE_PASS[method]
    count = len(form.structure.inputs)
    if level == "pixel":
        return _pixel(form, x, goal, method, count)
    result = form.run(x, goal, spec.needs(count))
    extra = {"query": options.get("query", "cls")} if method in ATTENTION_METHODS else {}
    tokens, rest = spec.compute(result, form.layout(x), count, **extra)
    return finish(form, x, tokens, rest, result.score, method, level)


def _pixel(form: Form, x: Tensor, goal: Target, method: str, count: int) -> Explanation:
    """Pixel level: the input term x ⊙ df/dx (or |df/dx|) and, for FullGrad, every bias map
    spread over its patch. FullGrad+ averages the pixel FullGrad with FullGrad_l of each block
    (each complete, so the mean is)."""
    full = method in ("fullgrad", "fullgrad+")
    blocks = tuple(range(count)) if method == "fullgrad+" else ()
    result = form.run(x, goal, Needs(blocks=blocks, sites=full, input_grad=True))
    grad, layout = result.input_grad, form.layout(x)
    if method == "gradient":
        pixels, rest = grad.abs().amax(1), result.score.new_zeros(x.shape[0])
    else:
        pixels, rest = (x * grad).sum(1), result.score.new_zeros(x.shape[0])
    if full:
        terms = count + 1 if method == "fullgrad+" else 1
        tokens, rest = site_sum(result, layout, lambda last: (last + 2) / terms
                                if method == "fullgrad+" else 1.0)
        tokens = tokens + sum((result.h[i] * result.g[i]).sum(-1) for i in blocks) / terms
        spread_pixels, prefix = spread(tokens, layout, tuple(x.shape[-2:]))
        pixels, rest = pixels / terms + spread_pixels, rest + prefix
    tokens, outside = pool(pixels, layout)
    return finish(form, x, tokens, rest + outside, result.score, method, "pixel", pixels)
