"""Gate rule: x * gate(x) with the gate a constant (GELU, SiLU, QuickGELU, x*sigmoid(a*x)).

The gate is computed directly (Phi(x), sigmoid(x)), never as act(x)/x. Written out, a gate is
a product c*x * g(x) whose other factor g is computed from the same x alone, element by
element, through at least one nonlinear op (tanh-GELU 0.5*x*(1 + tanh(...(x + 0.044715*x^3))),
erf-GELU x*0.5*(1 + erf(x/sqrt 2)), QuickGELU x*sigmoid(1.702*x)): g is detached, where the
self-gating rule would otherwise split the product into factors. A sigmoid gating another
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

from .. import optable
from ..dataflow import Dataflow
from ..graph_utils import detach_use, is_call, target_name
from .base import Rule, Swap, libra_form, swap, through_passthrough


@dataclass(frozen=True)
class WrittenGate:
    """A written-out ``c*x * g(x)`` (``own``; ``ops`` are g's nonlinear ops), or a sigmoid
    gating another branch."""

    gate: fx.Node
    own: bool
    ops: tuple[str, ...] = ()


# Arithmetic that is elementwise when its other operands are numbers or constants.
_ARITHMETIC = (operator.mul, operator.add, operator.sub, operator.truediv, operator.neg,
               operator.pow, torch.pow)


def _nonlinear(node) -> bool:
    """An elementwise nonlinearity by its op-table record (a gate or an elementwise op)."""
    op = optable.call_record(node)
    return op is not None and op.libra is not None and op.libra.rule in ("gate", "elementwise")


def _base(y):
    """x for y = x, c*x, x*c or x/c with c a number."""
    if is_call(y, operator.mul, operator.truediv) and len(y.args) == 2:
        a, b = y.args
        if isinstance(b, numbers.Number):
            return a
        if isinstance(a, numbers.Number) and y.target is operator.mul:
            return b
    return y


def _elementwise_of(value, x, flow: Dataflow) -> tuple[str, ...] | None:
    """The nonlinear ops through which ``value`` is computed from ``x`` alone, element by
    element (numbers and constants aside); None if it reads anything else or none is nonlinear."""
    stack, seen, ops = [value], set(), []
    while stack:
        v = stack.pop()
        if v is x or v in seen or not flow.depends_on_input(v):
            continue
        seen.add(v)
        if _nonlinear(v):
            ops.append(target_name(v).rsplit(".", 1)[-1])
        elif not is_call(v, *_ARITHMETIC):
            return None
        stack.extend(v.all_input_nodes)
    return tuple(dict.fromkeys(ops)) or None


def _match(node: fx.Node, flow: Dataflow) -> Swap | WrittenGate | None:
    if not flow.needs_rule(node):
        return None
    if (replacement := libra_form(node, "gate")) is not None:
        return Swap(replacement)
    if is_call(node, operator.mul) and len(node.args) == 2:
        for i, gate in enumerate(node.args):
            x = _base(node.args[1 - i])
            ops = _elementwise_of(gate, x, flow) if gate is not x else None
            if ops is not None and flow.depends_on_input(x):
                return WrittenGate(gate, own=True, ops=ops)
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
        return f"x*[g(x)]cst (written-out gate of {', '.join(payload.ops)})"
    return "a*[sigmoid(b)]cst (sigmoid gate of another branch)"


RULE = Rule(
    name="gate",
    summary="x * [act(x)/x]cst",
    match=_match,
    replace=_replace,
)
