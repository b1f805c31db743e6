"""explain(): every method in a vanilla and a LibraGrad form, from one switch.

An ``Explainer`` compiles the model once per form (``libra_transform`` with the rules, or with
none) and runs any method of the registry on either; ``explain(model, ...)`` keeps one
Explainer's compiled models per model in a weak cache, so repeated calls do not recompile and
a model that is dropped is not kept alive.
"""

from __future__ import annotations

import textwrap
import weakref
from collections.abc import Mapping
from types import MappingProxyType

from torch import Tensor, nn

from ..compiler import input_check
from ..compiler.graph_module import failure_reason
from ..errors import InputError, LibraError
from ..loading.text import embed_tokens
from .engine import CompiledModel
from .explanation import Explanation
from .registry import configure, describe
from .targets import has_text_tower, resolve

# (libra, blocks, frontend, input signature): the signature (x.shape[1:], dtype) only for a
# graph from torch.export, which is fixed to its example's shapes; None for any other graph
Key = tuple[bool, str | None, str, tuple | None]


class _ImageTower(nn.Module):
    """A CLIP model seen through ``encode_image``: the graph that image methods explain."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.training = False  # only this wrapper: the user's modules keep their flags

    def forward(self, image: Tensor) -> Tensor:
        return self.clip.encode_image(image)


def _signature(x: Tensor, input_name: str | None) -> tuple:
    """What an exported graph is specialised to: the input's shape past the batch, its dtype,
    and the keyword it is passed as (if one)."""
    base = (tuple(x.shape[1:]), x.dtype)
    return base if input_name is None else (*base, input_name)


class Explainer:
    """Attributions for one model; each form compiled on first use and kept.

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
        self._forms: dict[Key, CompiledModel] = {} if _forms is None else _forms

    def _cached(self, libra: bool, x: Tensor, input_name: str | None = None
                ) -> CompiledModel | None:
        form = (libra, self.blocks, self.frontend)
        exported = (_signature(x, input_name),)
        for signature in exported if input_name is not None else (None, *exported):
            if (*form, signature) in self._forms:  # (a keyword input is always exported)
                return self._forms[(*form, signature)]
        return None

    def compiled(self, libra: bool, x: Tensor, input_name: str | None = None) -> CompiledModel:
        """The model compiled in one form (``libra``) for inputs like ``x`` (passed as the
        keyword ``input_name`` if given), compiled now if it is not yet: once per form, or per
        input shape and dtype for an exported graph."""
        found = self._cached(libra, x, input_name)
        if found is not None:
            return found
        blocks = self.blocks if self.tower is self.model or self.blocks is None else (
            f"clip.{self.blocks}")
        compiled = CompiledModel(self.tower, libra, x, blocks, self.frontend, input_name)
        exported = compiled.gm.libra_report.frontend == "export"
        signature = _signature(x, input_name) if exported else None
        self._forms[(libra, self.blocks, self.frontend, signature)] = compiled
        return compiled

    def any_compiled(self, x: Tensor) -> CompiledModel:
        """A compiled model for forward-only work (both forms have the model's forward): one
        already compiled for inputs like ``x`` if there is one, else the vanilla one."""
        for libra in (True, False):
            found = self._cached(libra, x)
            if found is not None:
                return found
        return self.compiled(False, x)

    def compiled_forms(self) -> Mapping[Key, CompiledModel]:
        """A read-only, live view of the compiled models, by (libra, blocks, frontend,
        input signature or None): to see what is compiled, and that nothing is compiled twice."""
        return MappingProxyType(self._forms)

    @classmethod
    def cached(cls, model: nn.Module | Explainer, blocks: str | None = None) -> Explainer:
        """The Explainer of ``model`` that shares ``explain()``'s compiled models."""
        if isinstance(model, Explainer):
            return model
        if not isinstance(model, nn.Module):
            raise LibraError(f"explain needs a torch.nn.Module, got {type(model).__name__}")
        return cls(model, blocks=blocks, _forms=_FORMS.setdefault(model, {}))

    def explain(self, x: Tensor | None = None, *, target: object, method: str = "fullgrad+",
                libra: bool = True, level: str = "token", input_ids: Tensor | None = None,
                input_name: str | None = None, **options) -> Explanation:
        """See ``libragrad_fx.explain``."""
        record, settings = configure(method, level, options)
        if input_ids is not None:
            if x is not None:
                raise InputError("explain takes x or input_ids, not both")
            x, input_name = embed_tokens(self.model, input_ids), input_name or "inputs_embeds"
        input_check.check_input(x, "explain", model=self.model)
        objective = resolve(target, self.model, score=settings["score"],
                            tokenizer=settings["tokenizer"])
        if objective.count is not None and x.shape[0] == 1:
            x = x.expand(objective.count, *x.shape[1:])
        elif objective.count is not None and objective.count != x.shape[0]:
            raise InputError(f"{objective.count} targets for a batch of {x.shape[0]} samples; "
                             "pass one target, or one per sample")
        try:
            return record.explain(self.compiled(bool(libra), x, input_name), x, objective, level,
                                  settings)
        except LibraError:
            raise
        except Exception as exc:  # the model's own failure on this input, as one line
            raise InputError(
                f"explain could not run {type(self.model).__name__} on "
                f"{input_check.describe(x)}: {type(exc).__name__}: {failure_reason(exc)}. Pass "
                "the input the model accepts (an image model: (batch, channels, height, "
                "width) at the size it was built for)") from exc


# model -> its compiled models; they do not reference the model, so entries die with it
_FORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def explain(model: nn.Module | Explainer, x: Tensor | None = None, *, target: object,
            method: str = "fullgrad+", libra: bool = True, level: str = "token",
            input_ids: Tensor | None = None, input_name: str | None = None,
            **options) -> Explanation:
    """Attribute ``target``'s score at ``x`` with ``method``, in LibraGrad's form or vanilla.

    ``target``: a class index (int, or one per sample), a callable on the output, or for a CLIP
    model (``encode_image``/``encode_text``) a prompt, a list of prompts or a text embedding.
    ``level``: ``"token"`` (the first block's input tokens) or ``"pixel"``. Options: ``score``
    (``"logit"`` or ``"probability"``) and ``tokenizer`` for every method, and each method's
    own, listed below from the registry (``libragrad_fx.attribution.registry``) with their
    defaults; ``smoothgrad``'s ``base`` is any one-pass method. The model is compiled once per
    form and cached while it is alive.

    A model taking its input as a keyword (a Hugging Face model on ``inputs_embeds``) gets
    ``input_name``; a text model can be given ``input_ids`` instead of x: they are embedded
    with the model's own table (``embed_tokens``) and explained on ``inputs_embeds``, one map
    entry per token (``token_logit`` / ``continuation_logprob`` make decoder targets, and
    ``libragrad_fx.pictures.ansi``/``save_text`` draw the map over the tokens). The methods:

    """
    return Explainer.cached(model).explain(x, target=target, method=method, libra=libra,
                                           level=level, input_ids=input_ids,
                                           input_name=input_name, **options)


explain.__doc__ = f"{explain.__doc__}{textwrap.indent(describe(), '    ')}\n"
