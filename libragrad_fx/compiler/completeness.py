"""The numeric completeness check: f(x) - sum x.df/dx - sum_b b.df/db, per sample (DESIGN §3).

The bias terms are taken where each bias site enters the graph: the argument is replaced by a
fresh leaf with the same value, so implicit biases (a running mean, an expanded class token, a
concatenated q/v bias) are measured exactly as the certificate counts them, and the user's
parameters are never touched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ..errors import InputError, LibraError
from .bias import BiasSite
from .graph_module import LibraGraphModule, failure_reason
from .input_check import check_input

Target = int | Tensor | Callable[[Tensor], Tensor]
_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training",
                    "momentum", "eps")


@dataclass(frozen=True)
class Completeness:
    """Per-sample terms of FullGrad-completeness, each of shape (B,)."""

    score: Tensor  # f(x)
    input_term: Tensor  # sum x * df/dx
    bias_term: Tensor  # sum over bias sites of b * df/db

    @property
    def absolute(self) -> Tensor:
        return (self.score - self.input_term - self.bias_term).abs()

    @property
    def relative(self) -> Tensor:
        """The absolute error divided by |f(x)| (by 1 where f(x) is zero)."""
        scale = self.score.abs()
        return self.absolute / torch.where(scale > 0, scale, torch.ones_like(scale))


class _WithBiasLeaves(fx.Interpreter):
    """Runs the graph with every bias-site argument replaced by a leaf that requires grad."""

    def __init__(self, gm: fx.GraphModule, sites: list[BiasSite]) -> None:
        super().__init__(gm)
        self.paths: dict[str, list[tuple]] = {}
        for site in sites:
            self.paths.setdefault(site.node, []).append(site.path)
        self.leaves: list[Tensor] = []

    def run_node(self, n: fx.Node):
        if n.name not in self.paths:
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args, kwargs = list(args), dict(kwargs)
            if n.target is F.batch_norm:
                return self._batch_norm(n, args, kwargs)
            for path in self.paths[n.name]:
                self._substitute(args, kwargs, path)
            return getattr(self, n.op)(n.target, tuple(args), kwargs)

    def _batch_norm(self, n: fx.Node, args: list, kwargs: dict) -> Tensor:
        """Eval batch norm with leaves for its bias and its running mean.

        The kernel takes no gradient for the running mean, so its part of the implicit bias,
        -mean * weight / sqrt(var + eps), is added as (mean - leaf) * scale: zero in value,
        -scale in gradient.
        """
        call = dict(zip(_BATCH_NORM_ARGS, args, strict=False)) | kwargs
        mean_paths = {(1,), ("running_mean",)}
        for path in self.paths[n.name]:
            if path not in mean_paths:
                self._substitute(args, kwargs, path)
        out = F.batch_norm(*args, **kwargs)
        if not any(p in mean_paths for p in self.paths[n.name]):
            return out
        mean, var, weight = call["running_mean"], call["running_var"], call.get("weight")
        leaf = mean.detach().clone().requires_grad_(True)
        self.leaves.append(leaf)
        scale = torch.rsqrt(var + call.get("eps", 1e-5))
        scale = scale * weight.detach() if weight is not None else scale
        shape = (1, -1) + (1,) * (out.dim() - 2)
        return out + ((mean.detach() - leaf) * scale).reshape(shape)

    def _substitute(self, args: list, kwargs: dict, path: tuple) -> None:
        holder, key = (kwargs, path[0]) if isinstance(path[0], str) else (args, path[0])
        if len(path) == 2:
            holder[key] = list(holder[key])
            holder, key = holder[key], path[1]
        leaf = holder[key].detach().clone().requires_grad_(True)
        self.leaves.append(leaf)
        holder[key] = leaf


def _first_tensor(output: object) -> object:
    """A structured output's first tensor (a ModelOutput's ``logits`` or ``last_hidden_state``)."""
    if isinstance(output, Tensor):
        return output
    return next((v for v in pytree.tree_leaves(output) if isinstance(v, Tensor)), output)


def _score(output: object, target: Target, index: int) -> Tensor:
    if callable(target) and not isinstance(target, Tensor):
        value = target(output)
    else:
        logits = _first_tensor(output)
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise InputError("an integer target needs a model output of shape (batch, classes); "
                             "pass a callable target for other outputs (a decoder's next token: "
                             "lambda out: out.logits[:, -1, token])")
        cls = int(target.reshape(-1)[index if target.numel() > 1 else 0]) if isinstance(
            target, Tensor) else int(target)
        if not 0 <= cls < logits.shape[1]:
            raise InputError(f"target class {cls} is out of range for an output with "
                             f"{logits.shape[1]} classes")
        value = logits[:, cls]
    if value.numel() != 1:
        raise InputError(f"the target must give one score per sample, got shape "
                         f"{tuple(value.shape)} for one sample")
    return value.reshape(())


def _check_target(target: object, batch: int) -> None:
    """A class index (an int, or integers one per sample) or a callable; else one line."""
    if callable(target) and not isinstance(target, Tensor):
        return
    if isinstance(target, bool) or not isinstance(target, (int, Tensor)):
        raise InputError(f"completeness_error's target is a class index (an int or a tensor "
                         f"of one per sample) or a callable on the output; got {target!r}")
    if isinstance(target, Tensor) and (target.is_floating_point() or target.dim() > 1
                                       or target.numel() not in (1, batch)):
        raise InputError(f"a target tensor holds one class index per sample ({batch} here); "
                         f"got shape {tuple(target.shape)} ({target.dtype})")


def completeness_error(model_or_gm: nn.Module, x: Tensor, target: Target, *,
                       input_name: str | None = None) -> Completeness:
    """FullGrad-completeness of the model's gradient at ``x``, per sample.

    ``model_or_gm`` is a ``libra_transform`` result (its LibraGrad backward is measured) or any
    eval-mode model (measured as it is, through its vanilla graph). ``target`` is a class index
    (an int or one per sample) or a callable mapping the output of one sample to its score. An
    integer target reads the output's first tensor (a ModelOutput's ``logits``), which must be
    (batch, classes); score a decoder with a callable, ``lambda out: out.logits[:, -1, token]``.
    ``input_name`` is the keyword a plain model takes ``x`` as (``"inputs_embeds"``), as in
    ``libra_transform(model, example_inputs={input_name: x})``; a compiled module takes it
    positionally either way. Samples are run one at a time, since bias gradients are shared
    across a batch.
    """
    check_input(x, "completeness_error", model=model_or_gm if isinstance(model_or_gm, nn.Module)
                else None)
    _check_target(target, x.shape[0])
    if isinstance(model_or_gm, LibraGraphModule):
        gm = model_or_gm
    else:
        from .transform import libra_transform  # the vanilla graph, rules=()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = (x[:1],) if input_name is None else {input_name: x[:1]}
            gm = libra_transform(model_or_gm, rules=(), example_inputs=example)
    sites = gm.libra_report.bias_sites
    rows = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].detach().clone().requires_grad_(True)
        runner = _WithBiasLeaves(gm, sites)
        with torch.enable_grad():
            try:
                out = runner.run(xi.clone())  # a model may scale its input in place
            except LibraError:
                raise
            except Exception as exc:
                raise InputError(f"the model could not run on a sample of shape "
                                 f"{tuple(xi.shape)}: {failure_reason(exc)}") from exc
            score = _score(out, target, i)
            try:
                grads = torch.autograd.grad(score, [xi, *runner.leaves], allow_unused=True)
            except RuntimeError as exc:
                raise LibraError(f"the backward of the model failed: {exc}") from exc
        terms = [(v * g).sum() if g is not None else score.new_zeros(())
                 for v, g in zip([xi, *runner.leaves], grads, strict=True)]
        rows.append(torch.stack([score.detach(), terms[0], sum(terms[1:], score.new_zeros(()))]))
    table = torch.stack(rows).detach()
    return Completeness(table[:, 0], table[:, 1], table[:, 2])
