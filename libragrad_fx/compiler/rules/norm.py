"""Norm rule: the normalising statistic is a constant; the mean-centring stays differentiable.

Forms: ``F.layer_norm``, ``F.group_norm``, ``F.rms_norm``, ``F.normalize`` (fused, replaced by
operators with the same forward), and any written-out ``a / sqrt(stat)``, ``a * rsqrt(stat)``
or ``a / ||a||`` (over any dim: channels-first layer norms too), whose denominator is detached
where it is used; and a response ratio ``x * (||x|| / (mean ||x|| + eps))`` (global response
normalisation), whose ratio is the statistic, detached at the product (docs/theory.md).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..dataflow import Dataflow
from ..graph_utils import detach_use, is_call
from .base import Rule, Swap, libra_form, swap, through_passthrough


@dataclass(frozen=True)
class ResponseRatio:
    """``x * r`` with ``r = stat / reduce(stat)``: the ratio, degree 0 in x up to eps, is a
    normalising statistic; constant at ``operand``."""

    operand: int


@dataclass(frozen=True)
class WrittenNorm:
    """``a / sqrt(stat)``, ``a / ||a||`` or ``a * rsqrt(stat)``: the statistic at ``operand``."""

    operand: int


_ROOTS = {torch.sqrt: "sqrt", torch.rsqrt: "rsqrt", torch.norm: "norm",
          torch.linalg.vector_norm: "norm", torch.linalg.norm: "norm", torch.std: "std"}
_ROOT_METHODS = {"sqrt": "sqrt", "rsqrt": "rsqrt", "norm": "norm", "std": "std"}
_STAT_PASSTHROUGH = {"clamp", "clamp_min", "add"}


def _statistic(value) -> str | None:
    """The kind of root statistic that ``value`` is (through +eps, clamp, casts), or None."""
    while True:
        value = through_passthrough(value)
        if not isinstance(value, fx.Node):
            return None
        if value.op == "call_function" and value.target in _ROOTS:
            return _ROOTS[value.target]
        if value.op == "call_method" and value.target in _ROOT_METHODS:
            return _ROOT_METHODS[value.target]
        is_eps = is_call(value, operator.add) or (
            value.op == "call_method" and value.target in _STAT_PASSTHROUGH)
        if is_call(value, torch.clamp, torch.clamp_min) or is_eps:
            value = value.args[0]
            continue
        return None


_REDUCTIONS = (torch.mean, torch.sum, operator.add, torch.clamp, torch.clamp_min)
_REDUCTION_METHODS = {"mean", "sum", *_STAT_PASSTHROUGH}


def _ratio(value) -> str | None:
    """The statistic's kind when ``value`` is ``stat / reduce(stat)`` (a mean or sum of a root
    statistic, through +eps and clamps), else None."""
    value = through_passthrough(value)
    if not is_call(value, operator.truediv) or len(value.args) != 2:
        return None
    kind, den = _statistic(value.args[0]), value.args[1]
    if kind not in ("norm", "sqrt", "std"):
        return None
    while isinstance(den, fx.Node):
        den = through_passthrough(den)
        if _statistic(den) is not None:
            return kind
        reducing = is_call(den, *_REDUCTIONS) or (
            den.op == "call_method" and den.target in _REDUCTION_METHODS)
        if not reducing or not den.args:
            return None
        den = den.args[0]
    return None


def _match(node: fx.Node, flow: Dataflow) -> Swap | WrittenNorm | ResponseRatio | None:
    if not flow.needs_rule(node):
        return None
    if (replacement := libra_form(node, "norm")) is not None:
        return Swap(replacement)
    if is_call(node, operator.truediv, operator.mul) and len(node.args) == 2:
        # a / sqrt(stat), a / ||a||, and a * rsqrt(stat) in either order
        slots = (1,) if node.target is operator.truediv else (1, 0)
        wanted = ("sqrt", "norm", "std") if node.target is operator.truediv else ("rsqrt",)
        for i in slots:
            if _statistic(node.args[i]) in wanted and flow.depends_on_input(node.args[i]):
                return WrittenNorm(i)
    if is_call(node, operator.mul) and len(node.args) == 2:
        for i, operand in enumerate(node.args):
            if _ratio(operand) is not None and flow.depends_on_input(operand):
                return ResponseRatio(i)
    return None


def _replace(graph: fx.Graph, node: fx.Node, payload: Swap | WrittenNorm | ResponseRatio) -> str:
    if isinstance(payload, Swap):
        return swap(node, payload.replacement)
    if isinstance(payload, ResponseRatio):
        kind = _ratio(node.args[payload.operand])
        detach_use(graph, node, node.args[payload.operand])
        return f"x*[{kind}/mean({kind})]cst (response normalisation)"
    statistic = node.args[payload.operand]
    kind = _statistic(statistic)
    detach_use(graph, node, statistic)
    return f"[{kind}]cst (written-out normalisation)"


RULE = Rule(
    name="norm",
    summary="statistic constant: (x-mu)/[sigma]cst, x*[rsqrt]cst, x/[||x||]cst",
    match=_match,
    replace=_replace,
)
