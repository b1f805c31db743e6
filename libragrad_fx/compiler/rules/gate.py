"""Gate rule: x * gate(x) with the gate a constant (GELU, SiLU, QuickGELU, x*sigmoid(a*x)).

The gate is computed directly (Phi(x), sigmoid(x)), never as act(x)/x. A sigmoid gating another
input-dependent tensor (GLU, gated convolutions, squeeze-excitation: a * sigmoid(b)) is a gate
too: it is not homogeneous, so it cannot share the gradient as a self-gating factor; it becomes
a constant and a keeps the whole gradient.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..dataflow import Dataflow
from ..graph_utils import detach_use, is_call
from .base import Rule, Swap, libra_form, swap, through_passthrough


@dataclass(frozen=True)
class WrittenGate:
    """``x * sigmoid(a*x)`` written out (``own``), or a sigmoid gating another branch."""

    gate: fx.Node
    own: bool


def _scaled_copy_of(y, x) -> bool:
    """True when y is x or c*x / x*c for a number c."""
    if y is x:
        return True
    if is_call(y, operator.mul) and len(y.args) == 2:
        a, b = y.args
        return (a is x and isinstance(b, numbers.Number)) or (
            b is x and isinstance(a, numbers.Number))
    return False


def _match(node: fx.Node, flow: Dataflow) -> Swap | WrittenGate | None:
    if not flow.needs_rule(node):
        return None
    if (replacement := libra_form(node, "gate")) is not None:
        return Swap(replacement)
    if is_call(node, operator.mul) and len(node.args) == 2:
        for i, gate in enumerate(node.args):
            x = node.args[1 - i]
            if is_call(gate, torch.sigmoid) and _scaled_copy_of(gate.args[0], x):
                return WrittenGate(gate, own=True)
        for i, operand in enumerate(node.args):
            gate = through_passthrough(operand)
            if (is_call(gate, torch.sigmoid) and flow.depends_on_input(gate)
                    and flow.depends_on_input(node.args[1 - i])):
                return WrittenGate(operand, own=False)
    return None


def _replace(graph: fx.Graph, node: fx.Node, payload: Swap | WrittenGate) -> str:
    if isinstance(payload, Swap):
        return swap(node, payload.replacement)
    detach_use(graph, node, payload.gate)
    if payload.own:
        return "x*[sigmoid(a*x)]cst (written-out gate)"
    return "a*[sigmoid(b)]cst (sigmoid gate of another branch)"


RULE = Rule(
    name="gate",
    summary="x * [act(x)/x]cst",
    match=_match,
    replace=_replace,
)
