"""explain(): every method in a vanilla and a LibraGrad form, from one switch.

An ``Explainer`` compiles the model once per form (``libra_transform`` with the rules, or with
none) and runs any method on either; ``explain(model, ...)`` keeps one Explainer per model in a
weak cache, so repeated calls do not recompile and a model that is dropped is not kept alive.
"""

from __future__ import annotations

import weakref

import numpy
import torch
from torch import Tensor, nn

from ..errors import InputError, LibraError
from .attention_methods import ATTENTION_METHODS
from .engine import Form, Needs
from .explanation import Explanation
from .methods import GRADIENT_METHODS, site_sum
from .pixels import pool, spread
from .targets import Target, has_text_tower, resolve

SINGLE_PASS = {**GRADIENT_METHODS, **ATTENTION_METHODS}
METHODS = (*SINGLE_PASS, "integrated_gradients", "smoothgrad")
PIXEL_METHODS = ("gradient", "input_x_gradient", "integrated_gradients", "fullgrad",
                 "fullgrad+")
_COMMON = {"score", "tokenizer"}
_OPTIONS = {
    **{name: _COMMON for name in GRADIENT_METHODS},
    **{name: _COMMON | {"query"} for name in ATTENTION_METHODS},
    "integrated_gradients": _COMMON | {"steps", "baseline", "internal_batch_size", "rule"},
    "smoothgrad": _COMMON | {"base", "samples", "noise", "seed", "internal_batch_size", "query"},
}


class _ImageTower(nn.Module):
    """A CLIP model seen through ``encode_image``: the graph that image methods explain."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.training = False  # only this wrapper: the user's modules keep their flags

    def forward(self, image: Tensor) -> Tensor:
        return self.clip.encode_image(image)


class Explainer:
    """Attributions for one model; both forms compiled on first use and kept.

    ``blocks`` names the repeated blocks (``"blocks"``, ``"transformer.resblocks"``) where the
    graph does not make them clear; ``frontend`` is passed to ``libra_transform``.
    """

    def __init__(self, model: nn.Module, *, blocks: str | None = None, frontend: str = "auto",
                 _forms: dict | None = None):
        if not isinstance(model, nn.Module):
            raise LibraError(f"explain needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.tower = _ImageTower(model) if has_text_tower(model) else model
        self.blocks, self.frontend = blocks, frontend
        self._forms: dict = {} if _forms is None else _forms

    def form(self, libra: bool, x: Tensor) -> Form:
        key = (libra, self.blocks, self.frontend)
        if key not in self._forms:
            blocks = self.blocks if self.tower is self.model or self.blocks is None else (
                f"clip.{self.blocks}")
            self._forms[key] = Form(self.tower, libra, x, blocks, self.frontend)
        return self._forms[key]

    def any_form(self, x: Tensor) -> Form:
        """A compiled form for forward-only work (both forms have the model's forward): one
        already compiled if there is one, else the vanilla one."""
        for libra in (True, False):
            if (libra, self.blocks, self.frontend) in self._forms:
                return self._forms[(libra, self.blocks, self.frontend)]
        return self.form(False, x)

    @classmethod
    def cached(cls, model: nn.Module | Explainer, blocks: str | None = None) -> Explainer:
        """The Explainer of ``model`` that shares ``explain()``'s compiled forms."""
        if isinstance(model, Explainer):
            return model
        if not isinstance(model, nn.Module):
            raise LibraError(f"explain needs a torch.nn.Module, got {type(model).__name__}")
        return cls(model, blocks=blocks, _forms=_FORMS.setdefault(model, {}))

    def explain(self, x: Tensor, *, target: object, method: str = "fullgrad+",
                libra: bool = True, level: str = "token", **options) -> Explanation:
        """See ``libragrad_fx.explain``."""
        _check(method, level, options)
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise InputError("x must be a batched input tensor, (batch, channels, height, "
                             "width) for an image model")
        goal = resolve(target, self.model, score=options.get("score", "logit"),
                       tokenizer=options.get("tokenizer"))
        if goal.count is not None and x.shape[0] == 1:
            x = x.expand(goal.count, *x.shape[1:])
        elif goal.count is not None and goal.count != x.shape[0]:
            raise InputError(f"{goal.count} targets for a batch of {x.shape[0]} samples; pass "
                             "one target, or one per sample")
        form = self.form(bool(libra), x)
        if method == "integrated_gradients":
            return _integrated_gradients(form, x, goal, level, options)
        if method == "smoothgrad":
            return _smoothgrad(form, x, goal, level, options)
        return _single(form, x, goal, method, level, options)


def _check(method: str, level: str, options: dict) -> None:
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; the methods are: {', '.join(METHODS)}")
    if level not in ("token", "pixel"):
        raise InputError(f"level must be 'token' or 'pixel', got {level!r}")
    unknown = set(options) - _OPTIONS[method]
    if unknown:
        raise InputError(f"{method} takes no option {', '.join(sorted(unknown))}; it takes: "
                         f"{', '.join(sorted(_OPTIONS[method]))}")
    base = options.get("base", "gradient") if method == "smoothgrad" else method
    if method == "smoothgrad" and base not in SINGLE_PASS:
        raise InputError(f"smoothgrad's base must be a single-pass method "
                         f"({', '.join(SINGLE_PASS)}), got {base!r}")
    if level == "pixel" and base not in PIXEL_METHODS:
        raise InputError(f"{base} has no pixel level; level='pixel' serves "
                         f"{', '.join(PIXEL_METHODS)}")


def _finish(form: Form, x: Tensor, tokens: Tensor, rest: Tensor, score: Tensor, method: str,
            level: str, pixels: Tensor | None = None, baseline: Tensor | None = None
            ) -> Explanation:
    layout = form.layout(x)
    gh, gw = layout.grid
    patches = tokens[:, layout.prefix:].reshape(-1, gh, gw)
    return Explanation(tokens.detach(), patches.detach(), rest.detach(), score, baseline,
                       method, form.libra, level, layout.prefix,
                       None if pixels is None else pixels.detach())


def _single(form: Form, x: Tensor, goal: Target, method: str, level: str,
            options: dict) -> Explanation:
    spec = SINGLE_PASS[method]
    count = len(form.structure.inputs)
    if level == "pixel":
        return _pixel(form, x, goal, method, count)
    result = form.run(x, goal, spec.needs(count))
    extra = {"query": options.get("query", "cls")} if method in ATTENTION_METHODS else {}
    tokens, rest = spec.compute(result, form.layout(x), count, **extra)
    return _finish(form, x, tokens, rest, result.score, method, level)


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
    return _finish(form, x, tokens, rest + outside, result.score, method, "pixel", pixels)


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield torch.arange(start, min(start + size, total))


def _integrated_gradients(form: Form, x: Tensor, goal: Target, level: str,
                          options: dict) -> Explanation:
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
    steps = int(options.get("steps", 50))
    size = int(options.get("internal_batch_size", 16))
    rule = options.get("rule", "gausslegendre")
    if steps < 1 or size < 1:
        raise InputError("steps and internal_batch_size must be positive")
    if rule not in ("middle", "right", "gausslegendre"):
        raise InputError(f"rule must be 'middle', 'right' or 'gausslegendre', got {rule!r}")
    batch = x.shape[0]
    layout = form.layout(x)
    baseline = options.get("baseline")
    if level == "token":
        h0 = form.structure.inputs[0]
        axis = layout.axes[h0].batch
        full = form.probe((h0,))
        with torch.no_grad():
            output, values = full(x)
            score = goal.score(output, form.libra)
            start = values[h0].movedim(axis, 0)
            if isinstance(baseline, str) and baseline == "zero-tokens":
                origin = torch.zeros_like(start)
            else:
                origin = full(_baseline(baseline, x))[1][h0].movedim(axis, 0)
        tail = form.probe((), start=h0)

        def run(rows: Tensor, point: Tensor):
            return tail(x[rows], point.movedim(0, axis))[0]
    else:
        start = x.detach()
        origin = _baseline(baseline, x)
        probe = form.probe(())
        with torch.no_grad():
            score = goal.score(probe(x)[0], form.libra)

        def run(rows: Tensor, point: Tensor):
            return probe(point)[0]
    with torch.no_grad():
        baseline_score = goal.score(run(torch.arange(batch), origin), form.libra)
    total = torch.zeros_like(start)
    alphas, weights = _quadrature(rule, steps)
    shape = (-1, *[1] * (start.dim() - 1))
    for rows in _chunks(steps * batch, size):
        sample, step = rows % batch, rows // batch
        alpha = alphas[step].to(start.device, start.dtype).reshape(shape)
        point = (origin[sample] + alpha * (start - origin)[sample])
        point = point.detach().requires_grad_(True)
        with torch.enable_grad():
            f = goal.take(sample).score(run(sample, point), form.libra)
            (grad,) = torch.autograd.grad(f.sum(), point)
        weight = weights[step].to(start.device, start.dtype).reshape(shape)
        total.index_add_(0, sample.to(total.device), grad.detach() * weight)
    attribution = (start - origin) * total
    zero = score.new_zeros(batch)
    if level == "token":
        axes = layout.axes[h0]
        token_axis = axes.tokens + (axes.tokens < axes.batch)
        tokens = attribution.movedim(token_axis, 1).sum(-1)[:, list(layout.order)]
        return _finish(form, x, tokens, zero, score, "integrated_gradients", level,
                       baseline=baseline_score)
    pixels = attribution.sum(1)
    tokens, outside = pool(pixels, layout)
    return _finish(form, x, tokens, outside, score, "integrated_gradients", level, pixels,
                   baseline_score)


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


def _smoothgrad(form: Form, x: Tensor, goal: Target, level: str,
                options: dict) -> Explanation:
    """The base method's maps averaged over ``samples`` copies of x with Gaussian noise of
    standard deviation ``noise`` times each image's value range."""
    base = options.get("base", "gradient")
    samples = int(options.get("samples", 16))
    size = int(options.get("internal_batch_size", 16))
    if samples < 1 or size < 1:
        raise InputError("samples and internal_batch_size must be positive")
    batch = x.shape[0]
    span = (x.amax(tuple(range(1, x.dim()))) - x.amin(tuple(range(1, x.dim()))))
    sigma = float(options.get("noise", 0.15)) * span.reshape(-1, *[1] * (x.dim() - 1))
    generator = torch.Generator().manual_seed(int(options.get("seed", 0)))
    noise = torch.randn((samples, *x.shape), generator=generator, dtype=x.dtype)
    noisy = (x[None] + sigma[None] * noise.to(x.device)).flatten(0, 1)
    sums = None
    inner = {k: v for k, v in options.items() if k == "query"}
    for rows in _chunks(samples * batch, size):
        sample = rows % batch
        part = _single(form, noisy[rows], goal.take(sample), base, level, inner)
        fields = (part.token_map, part.remainder,
                  part.pixel_map if part.pixel_map is not None else part.remainder[:, None])
        if sums is None:
            sums = [torch.zeros(batch, *f.shape[1:], dtype=f.dtype, device=f.device)
                    for f in fields]
        for total, value in zip(sums, fields, strict=True):
            total.index_add_(0, sample.to(total.device), value)
    tokens, rest, pixels = (s / samples for s in sums)
    with torch.no_grad():
        score = goal.score(form.probe(())(x)[0], form.libra)
    return _finish(form, x, tokens, rest, score, "smoothgrad", level,
                   pixels if level == "pixel" else None)


# model -> its compiled forms; the forms do not reference the model, so entries die with it
_FORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def explain(model: nn.Module | Explainer, x: Tensor, *, target: object,
            method: str = "fullgrad+", libra: bool = True, level: str = "token",
            **options) -> Explanation:
    """Attribute ``target``'s score at ``x`` with ``method``, in LibraGrad's form or vanilla.

    ``target``: a class index (int, or one per sample), a callable on the output, or for a CLIP
    model (``encode_image``/``encode_text``) a prompt, a list of prompts or a text embedding.
    ``level``: ``"token"`` (the first block's input tokens) or ``"pixel"``. Options:
    ``score="logit"|"probability"``, ``tokenizer``; integrated_gradients: ``steps`` (50),
    ``baseline`` (an image, zero by default, or ``"zero-tokens"``), ``rule``
    ("gausslegendre", "middle" or "right"), ``internal_batch_size`` (16); smoothgrad:
    ``base`` ("gradient"), ``samples`` (16), ``noise`` (0.15), ``seed``; attention methods:
    ``query="cls"|"mean"``.
    The model is compiled once per form and cached while it is alive.
    """
    return Explainer.cached(model).explain(x, target=target, method=method, libra=libra,
                                           level=level, **options)
