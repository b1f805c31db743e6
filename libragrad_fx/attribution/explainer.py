"""explain(): every method in a vanilla and a LibraGrad form, from one switch.

An ``Explainer`` compiles the model once per form (``libra_transform`` with the rules, or with
none) and runs any method on either; ``explain(model, ...)`` keeps one Explainer per model in a
weak cache, so repeated calls do not recompile and a model that is dropped is not kept alive.
"""

from __future__ import annotations

import weakref

from torch import Tensor, nn

from ..errors import InputError, LibraError
from .attention_methods import ATTENTION_METHODS
from .engine import Form
from .explanation import Explanation
from .methods import GRADIENT_METHODS
from .multipass import integrated_gradients, smoothgrad
from .single import SINGLE_PASS, single
from .targets import has_text_tower, resolve

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
            return integrated_gradients(form, x, goal, level, options)
        if method == "smoothgrad":
            return smoothgrad(form, x, goal, level, options)
        return single(form, x, goal, method, level, options)


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
