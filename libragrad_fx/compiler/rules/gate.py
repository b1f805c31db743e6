"""Gate rule: x * gate(x) with the gate a constant (GELU, SiLU, QuickGELU, x*sigmoid(a*x)).

The gate is computed directly (Phi(x), sigmoid(x)), never as act(x)/x. A sigmoid gating another
input-dependent tensor (GLU, gated convolutions, squeeze-excitation: a * sigmoid(b)) is a gate
too: it is not homogeneous, so it cannot share the gradient as a self-gating factor; it becomes
a constant and a keeps the whole gradient.
"""

from __future__ import annotations

import numbers
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...runtime import ops
from ..dataflow import Dataflow
from ..graph_utils import arg, detach_use, is_call
from .base import Rule, through_passthrough


def _scaled_copy_of(y, x) -> bool:
    """True when y is x or c*x / x*c for a number c."""
    if y is x:
        return True
    if is_call(y, operator.mul) and len(y.args) == 2:
        a, b = y.args
        return (a is x and isinstance(b, numbers.Number)) or (
            b is x and isinstance(a, numbers.Number))
    return False


def _match(node: fx.Node, flow: Dataflow):
    if not flow.needs_rule(node):
        return None
    if is_call(node, F.gelu, F.silu, F.glu):
        return "fused"
    if is_call(node, operator.mul) and len(node.args) == 2:
        for i, gate in enumerate(node.args):
            x = node.args[1 - i]
            if is_call(gate, torch.sigmoid) and _scaled_copy_of(gate.args[0], x):
                return "self", gate
        for i, operand in enumerate(node.args):
            gate = through_passthrough(operand)
            if (is_call(gate, torch.sigmoid) and flow.depends_on_input(gate)
                    and flow.depends_on_input(node.args[1 - i])):
                return "other", operand
    return None


def _replace(graph: fx.Graph, node: fx.Node, payload) -> str:
    if payload == "fused":
        if node.target is F.gelu:
            approximate = arg(node, 1, "approximate", "none")
            node.target, node.args, node.kwargs = ops.libra_gelu, (node.args[0], approximate), {}
            return f"x*[Phi(x)]cst ({'tanh' if approximate == 'tanh' else 'erf'} GELU)"
        if node.target is F.glu:
            x, dim = arg(node, 0, "input"), arg(node, 1, "dim", -1)
            node.target, node.args, node.kwargs = ops.libra_glu, (x, dim), {}
            return "a*[sigmoid(b)]cst (GLU)"
        node.target, node.args, node.kwargs = ops.libra_silu, (arg(node, 0, "input"),), {}
        return "x*[sigmoid(x)]cst (SiLU)"
    form, gate = payload
    detach_use(graph, node, gate)
    if form == "self":
        return "x*[sigmoid(a*x)]cst (written-out gate)"
    return "a*[sigmoid(b)]cst (sigmoid gate of another branch)"


RULE = Rule(
    name="gate",
    summary="x * [act(x)/x]cst",
    match=_match,
    replace=_replace,
)
