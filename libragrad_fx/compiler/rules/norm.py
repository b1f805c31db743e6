"""Norm rule: the normalising statistic is a constant; the mean-centring stays differentiable.

Forms: ``F.layer_norm``, ``F.group_norm``, ``F.rms_norm``, ``F.normalize`` (fused, replaced by
operators with the same forward), and any written-out ``a / sqrt(stat)``, ``a * rsqrt(stat)``
or ``a / ||a||`` (over any dim: channels-first layer norms too), whose denominator is detached
where it is used.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...runtime import ops
from ..dataflow import Dataflow
from ..graph_utils import arg, detach_use, is_call
from .base import Rule, through_passthrough

_FUSED = {
    F.layer_norm: (ops.libra_layer_norm, "x-mu over [sigma]cst (layer_norm)"),
    F.group_norm: (ops.libra_group_norm, "x-mu over [sigma]cst per group (group_norm)"),
    F.rms_norm: (ops.libra_rms_norm, "x*[rsqrt(mean x^2)]cst (rms_norm)"),
    F.normalize: (ops.libra_normalize, "x/[||x||]cst (normalize)"),
}
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


def _match(node: fx.Node, flow: Dataflow):
    if not flow.needs_rule(node):
        return None
    if node.op == "call_function" and node.target in _FUSED:
        return "fused"
    if is_call(node, operator.truediv, operator.mul) and len(node.args) == 2:
        # a / sqrt(stat), a / ||a||, and a * rsqrt(stat) in either order
        slots = (1,) if node.target is operator.truediv else (1, 0)
        wanted = ("sqrt", "norm", "std") if node.target is operator.truediv else ("rsqrt",)
        for i in slots:
            if _statistic(node.args[i]) in wanted and flow.depends_on_input(node.args[i]):
                return i
    return None


def _replace(graph: fx.Graph, node: fx.Node, payload) -> str:
    if payload == "fused":
        target, words = _FUSED[node.target]
        x = arg(node, 0, "input")
        if node.target is F.normalize:
            args = (x, arg(node, 1, "p", 2.0), arg(node, 2, "dim", 1), arg(node, 3, "eps", 1e-12))
        elif node.target is F.group_norm:
            args = (x, arg(node, 1, "num_groups"), arg(node, 2, "weight", None),
                    arg(node, 3, "bias", None), arg(node, 4, "eps", 1e-5))
        elif node.target is F.rms_norm:
            args = (x, arg(node, 1, "normalized_shape"), arg(node, 2, "weight", None),
                    arg(node, 3, "eps", None))
        else:
            args = (x, arg(node, 1, "normalized_shape"), arg(node, 2, "weight", None),
                    arg(node, 3, "bias", None), arg(node, 4, "eps", 1e-5))
        node.target, node.args, node.kwargs = target, args, {}
        return words
    kind = _statistic(node.args[payload])
    detach_use(graph, node, node.args[payload])
    return f"[{kind}]cst (written-out normalisation)"


RULE = Rule(
    name="norm",
    summary="statistic constant: (x-mu)/[sigma]cst, x*[rsqrt]cst, x/[||x||]cst",
    match=_match,
    replace=_replace,
)
