"""Methods that average many passes: integrated gradients along a path, SmoothGrad over
noisy copies. Rows are evaluated in chunks of ``internal_batch_size``, so memory follows the
chunk, not the number of steps or samples."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import numpy
import torch
from torch import Tensor

from ..errors import InputError
from .engine import CompiledModel
from .explanation import Explanation, to_explanation
from .pixels import pool
from .stream import TokenStream
from .targets import Target

if TYPE_CHECKING:
    from .registry import Method


def _chunks(total: int, size: int) -> Iterator[Tensor]:
    for start in range(0, total, size):
        yield torch.arange(start, min(start + size, total))


def integrated_gradients(method: Method, compiled: CompiledModel, x: Tensor, target: Target,
                         level: str, settings: Mapping[str, object]) -> Explanation:
    """(h - h')·Σ_j w_j ∇f(h' + α_j(h - h')), batched over steps in chunks of
    ``internal_batch_size`` rows.

    h is the image (pixel level) or the first block's input (token level). The baseline image
    is ``baseline`` (zero by default); at token level h' is that image's first-block input, or
    the zero residual stream with ``baseline="zero-tokens"``. The points and weights are
    Gauss-Legendre's (``rule="gausslegendre"``, the default), the midpoints (``"middle"``) or
    the right ends j/m with weights 1/m (``"right"``, DESIGN §4's sum). A pre-norm Transformer's
    score changes steeply near the baseline, where LayerNorm rescales a small stream, and the
    uniform sums miss it (docs/attribution.md has the numbers); so does any sum from a zero
    stream, LayerNorm's singular point, which is why that is not the default baseline.
    """
    steps = int(settings["steps"])
    size = int(settings["internal_batch_size"])
    rule = settings["rule"]
    if steps < 1 or size < 1:
        raise InputError("steps and internal_batch_size must be positive")
    if rule not in ("middle", "right", "gausslegendre"):
        raise InputError(f"rule must be 'middle', 'right' or 'gausslegendre', got {rule!r}")
    batch = x.shape[0]
    layout = compiled.layout(x)
    baseline = settings["baseline"]
    if level == "token":
        stream = TokenStream(compiled, x, spatial=True)
        output, start = stream.first_input(x)
        with torch.no_grad():
            score = target.score(output, compiled.libra)
        if isinstance(baseline, str) and baseline == "zero-tokens":
            origin = torch.zeros_like(start)
        else:
            origin = stream.first_input(_baseline(baseline, x))[1]

        def run(rows: Tensor, point: Tensor):
            return stream.tail(x[rows], point)
    else:
        start = x.detach()
        origin = _baseline(baseline, x)
        probe = compiled.probe(())
        with torch.no_grad():
            score = target.score(probe(x)[0], compiled.libra)

        def run(rows: Tensor, point: Tensor):
            return probe(point)[0]
    with torch.no_grad():
        baseline_score = target.score(run(torch.arange(batch), origin), compiled.libra)
    total = torch.zeros_like(start)
    alphas, weights = _quadrature(rule, steps)
    shape = (-1, *[1] * (start.dim() - 1))
    for rows in _chunks(steps * batch, size):
        sample, step = rows % batch, rows // batch
        alpha = alphas[step].to(start.device, start.dtype).reshape(shape)
        point = (origin[sample] + alpha * (start - origin)[sample])
        point = point.detach().requires_grad_(True)
        with torch.enable_grad():
            f = target.take(sample).score(run(sample, point), compiled.libra)
            (grad,) = torch.autograd.grad(f.sum(), point)
        weight = weights[step].to(start.device, start.dtype).reshape(shape)
        total.index_add_(0, sample.to(total.device), grad.detach() * weight)
    attribution = (start - origin) * total
    if level == "token":  # h_0's shape, batch first
        tokens = stream.to_tokens(attribution)
        return to_explanation(layout, compiled.libra, method.name, level, tokens,
                              score.new_zeros(batch), score, baseline_score=baseline_score)
    pixels = attribution.sum(1)
    tokens, outside = pool(pixels, layout)
    return to_explanation(layout, compiled.libra, method.name, level, tokens, outside, score,
                          pixels, baseline_score)


def _quadrature(rule: str, steps: int) -> tuple[Tensor, Tensor]:
    """Points α_j in (0, 1] and weights summing to 1 for ∫_0^1 ∇f(h' + α(h - h')) dα."""
    if rule == "gausslegendre":
        nodes, weights = numpy.polynomial.legendre.leggauss(steps)
        return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)
    shift = 0.5 if rule == "middle" else 0.0
    alphas = (torch.arange(1, steps + 1, dtype=torch.float64) - shift) / steps
    return alphas, torch.full((steps,), 1 / steps, dtype=torch.float64)


def _baseline(value: object, x: Tensor) -> Tensor:
    if isinstance(value, str):
        raise InputError(f"baseline {value!r}: the only named baseline is 'zero-tokens' (token "
                         "level); otherwise pass a number or an image tensor")
    if value is None:
        return torch.zeros_like(x)
    if isinstance(value, (int, float)):
        return torch.full_like(x, float(value))
    if isinstance(value, Tensor):
        try:
            return value.to(x.device, x.dtype).expand_as(x).clone()
        except RuntimeError as exc:
            raise InputError(f"baseline of shape {tuple(value.shape)} does not broadcast to "
                             f"the input's {tuple(x.shape)}") from exc
    raise InputError(f"baseline must be a number or a tensor, got {type(value).__name__}")


def smoothgrad(method: Method, compiled: CompiledModel, x: Tensor, target: Target,
               level: str, settings: Mapping[str, object]) -> Explanation:
    """The base method's maps averaged over ``samples`` copies of x with Gaussian noise of
    standard deviation ``noise`` times each image's value range (Captum's NoiseTunnel)."""
    samples = int(settings["samples"])
    size = int(settings["internal_batch_size"])
    if samples < 1 or size < 1:
        raise InputError("samples and internal_batch_size must be positive")
    batch = x.shape[0]
    span = (x.amax(tuple(range(1, x.dim()))) - x.amin(tuple(range(1, x.dim()))))
    sigma = float(settings["noise"]) * span.reshape(-1, *[1] * (x.dim() - 1))
    generator = torch.Generator().manual_seed(int(settings["seed"]))
    noise = torch.randn((samples, *x.shape), generator=generator, dtype=x.dtype)
    noisy = (x[None] + sigma[None] * noise.to(x.device)).flatten(0, 1)
    sums = None
    for rows in _chunks(samples * batch, size):
        sample = rows % batch
        part = method.base.explain(compiled, noisy[rows], target.take(sample), level, settings)
        fields = (part.token_map, part.remainder,
                  part.pixel_map if part.pixel_map is not None else part.remainder[:, None])
        if sums is None:
            sums = [torch.zeros(batch, *f.shape[1:], dtype=f.dtype, device=f.device)
                    for f in fields]
        for total, value in zip(sums, fields, strict=True):
            total.index_add_(0, sample.to(total.device), value)
    tokens, rest, pixels = (s / samples for s in sums)
    with torch.no_grad():
        score = target.score(compiled.probe(())(x)[0], compiled.libra)
    return to_explanation(compiled.layout(x), compiled.libra, method.name, level, tokens, rest,
                          score, pixels if level == "pixel" else None)
