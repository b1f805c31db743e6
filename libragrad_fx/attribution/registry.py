"""The method registry: every attribution method is one ``Method`` record.

A record holds the method's name, its own options with their defaults, the levels it has,
and its computation: one-pass methods a formula per level (``OnePass``: what the run must read
and the map), the others their own ``run`` (integrated gradients along a path; SmoothGrad, a
wrapper whose ``base`` option picks the method it averages). ``configure`` checks a call
against the record and fills in the defaults, so nothing else names a method or a default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from torch import Tensor

from ..errors import InputError
from . import attention_methods as att
from . import methods as grad
from .engine import CompiledModel
from .explanation import Explanation
from .multipass import integrated_gradients, smoothgrad
from .one_pass import OnePass, run_one_pass
from .targets import Target

LEVELS = ("token", "pixel")
# every method's options: how the target is scored, and the tokenizer for prompts
COMMON_OPTIONS = MappingProxyType({"score": "logit", "tokenizer": None})

Run = Callable[["Method", CompiledModel, Tensor, Target, str, Mapping[str, object]],
               Explanation]


@dataclass(frozen=True)
class Method:
    """One attribution method: name, options and defaults, levels and computation.

    ``token``/``pixel``: a one-pass method's formula at each level (``pixel`` None: token
    level only). ``wraps``: the method runs its ``base`` option's method (SmoothGrad); bound by
    ``configure``, ``base`` is that record and the levels are the base's.
    """

    name: str
    summary: str
    run: Run = run_one_pass
    options: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    levels: tuple[str, ...] = ("token",)
    token: OnePass | None = None
    pixel: OnePass | None = None
    wraps: bool = False
    base: Method | None = None

    @property
    def one_pass(self) -> bool:
        """Whether one forward-backward run computes it (what SmoothGrad can average)."""
        return self.token is not None

    def explain(self, compiled: CompiledModel, x: Tensor, target: Target, level: str,
                settings: Mapping[str, object]) -> Explanation:
        return self.run(self, compiled, x, target, level, settings)


def _one_pass(name: str, summary: str, token: OnePass, pixel: OnePass | None = None,
              options: Mapping[str, object] | None = None) -> Method:
    return Method(name, summary, options=MappingProxyType(dict(options or {})),
                  levels=LEVELS if pixel is not None else ("token",), token=token, pixel=pixel)


def _attention(name: str, summary: str, compute: Callable,
               needs: Callable = att.attention_needs) -> Method:
    return _one_pass(name, summary, OnePass(needs, compute), options={"query": "cls"})


_FULLGRAD, _FULLGRAD_PLUS = grad.FullGrad(every_block=False), grad.FullGrad(every_block=True)
_ONE_PASS = (
    _one_pass("gradient", "max over channels of |df/dh_0| (pixel: of |df/dx|)",
              OnePass(grad.first_block, grad.gradient),
              OnePass(grad.input_grad, grad.gradient_pixels)),
    _one_pass("input_x_gradient", "Σ_c h_0 ⊙ df/dh_0 (pixel: Σ_c x ⊙ df/dx)",
              OnePass(grad.first_block, grad.input_x_gradient),
              OnePass(grad.input_grad, grad.input_x_gradient_pixels)),
    _one_pass("fullgrad", "h_0 ⊙ g_0 + the bias maps after block 0",
              _FULLGRAD.token, _FULLGRAD.pixel),
    _one_pass("fullgrad+", "mean over blocks l of FullGrad_l",
              _FULLGRAD_PLUS.token, _FULLGRAD_PLUS.pixel),
    _one_pass("hirescam", "Σ_c h_{L-1} ⊙ g_{L-1}", OnePass(grad.last_block, grad.hirescam)),
    _one_pass("gradcam", "Σ_c mean_t(g_{L-1}) h_{L-1}, no ReLU (tokens='patches': over the "
              "patch tokens only, as pytorch-grad-cam)",
              OnePass(grad.last_block, grad.gradcam), options={"tokens": "all"}),
    _one_pass("xgradcam+", "XGradCAM weights on |h_{L-1}| (tokens='patches' as gradcam)",
              OnePass(grad.last_block, grad.xgradcam_plus), options={"tokens": "all"}),
    _one_pass("layercam", "ReLU(Σ_c ReLU(g_{L-1}) h_{L-1})",
              OnePass(grad.last_block, grad.layercam)),
    _attention("attention", "mean-head attention of the last block, class row", att.attention),
    _attention("rollout", "Π_l (½I + ½Ā_l), class row", att.rollout),
    _attention("genatt", "R ← R + mean_h ReLU(∇A ⊙ A) R (Chefer et al. 2021b)", att.genatt),
    _attention("gradsam", "mean over layers and heads of ReLU(∇A) ⊙ A", att.gradsam),
    _attention("attcat", "Σ_l Ā_l[cls] ⊙ Σ_c h_l ⊙ g_l", att.attcat, att.attention_and_blocks),
    _attention("tokentm", "GenAtt weighted by the length of each token's transformation",
               att.tokentm, att.transformation_needs),
)
_INTEGRATED_GRADIENTS = Method(
    "integrated_gradients", "(h − h′) ⊙ ∫₀¹ ∇f(h′ + α(h − h′)) dα", integrated_gradients,
    MappingProxyType({"steps": 50, "baseline": None, "rule": "gausslegendre",
                      "internal_batch_size": 16}), LEVELS)
_SMOOTHGRAD = Method(
    "smoothgrad", "a one-pass method averaged over noisy copies of x", smoothgrad,
    MappingProxyType({"base": "gradient", "samples": 16, "noise": 0.15, "seed": 0,
                      "internal_batch_size": 16,
                      **{k: v for m in _ONE_PASS for k, v in m.options.items()}}),
    levels=(), wraps=True)

# The path method sits with the input methods it integrates; METHODS lists the one-pass
# methods (SmoothGrad's possible bases) first.
_ORDER = (*_ONE_PASS[:2], _INTEGRATED_GRADIENTS, *_ONE_PASS[2:], _SMOOTHGRAD)
REGISTRY: Mapping[str, Method] = MappingProxyType({m.name: m for m in _ORDER})
ONE_PASS = tuple(m.name for m in _ORDER if m.one_pass)
METHODS = (*ONE_PASS, *(m.name for m in _ORDER if not m.one_pass))
PIXEL_METHODS = tuple(m.name for m in _ORDER if "pixel" in m.levels)


def configure(name: str, level: str, options: Mapping[str, object]
              ) -> tuple[Method, dict[str, object]]:
    """The record that computes ``name`` at ``level``, and every option's value (the given
    ones, else the defaults); ``InputError`` for a method, level or option that is not."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; the methods are: {', '.join(METHODS)}")
    if level not in LEVELS:
        raise InputError(f"level must be 'token' or 'pixel', got {level!r}")
    method = REGISTRY[name]
    accepted = {**COMMON_OPTIONS, **method.options}
    unknown = set(options) - set(accepted)
    if unknown:
        raise InputError(f"{name} takes no option {', '.join(sorted(unknown))}; it takes: "
                         f"{', '.join(sorted(accepted))}")
    settings = {**accepted, **options}
    if method.wraps:
        base = settings["base"]
        if base not in ONE_PASS:
            raise InputError(f"{name}'s base must be a single-pass method "
                             f"({', '.join(ONE_PASS)}), got {base!r}")
        method = replace(method, base=REGISTRY[base], levels=REGISTRY[base].levels)
    if level not in method.levels:
        lacking = method.base.name if method.base is not None else name
        serving = tuple(m for m, r in REGISTRY.items() if level in r.levels)
        raise InputError(f"{lacking} has no {level} level; level={level!r} serves "
                         f"{', '.join(serving)}")
    return method, settings


def describe() -> str:
    """One line per method: its name, levels and own options with their defaults."""
    lines = []
    for m in _ORDER:
        levels = "/".join(m.levels) if m.levels else "as its base"
        options = ", ".join(f"{k}={v!r}" for k, v in m.options.items())
        lines.append(f"{m.name} ({levels}){': ' + options if options else ''}")
    return "\n".join(lines)
