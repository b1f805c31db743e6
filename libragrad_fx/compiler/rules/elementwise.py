"""Elementwise rule: y = phi(x) becomes phi(0) + x * [(phi(x) - phi(0)) / x]cst.

Beyond the paper (DESIGN.md §1): any elementwise nonlinearity the gate rule has not taken
(tanh, a lone sigmoid, hardswish, softplus, mish, ELU/SELU/CELU, hardtanh/ReLU6, erf) keeps
the degree of x once the secant slope is a constant, and phi(0), where it is not 0, is a bias
site: a 0-dim buffer this rule adds to the graph and passes to the op's Libra form
(``runtime/elementwise.py``), so ``completeness_error`` and ``report.bias_sites`` count it.
Which ops are elementwise is their op-table record (``libra=Replacement("elementwise", ...)``).
The gate rule is its case phi(0) = 0 written as a gate, and runs first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..dataflow import Dataflow
from ..graph_utils import arg
from ..opspec import Replacement
from .base import Rule, libra_form


@dataclass(frozen=True)
class Secant:
    """The op phi, its Libra form, x and the arguments after it (numbers, read by phi(0))."""

    phi: Callable
    replacement: Replacement
    x: fx.Node
    rest: tuple[Any, ...]


def _match(node: fx.Node, flow: Dataflow) -> Secant | None:
    if not flow.needs_rule(node) or (replacement := libra_form(node, "elementwise")) is None:
        return None
    bound = [arg(node, b.index, b.name) if b.required else arg(node, b.index, b.name, b.default)
             for b in replacement.args]
    names = {b.name for b in replacement.args}
    extra = [*node.args[len(bound):], *(v for k, v in node.kwargs.items() if k not in names)]
    if any(e not in (False, None) for e in extra):
        return None  # inplace=True (it would change later readers of x), or an unknown argument
    x, rest = bound[0], tuple(bound[1:])
    if not isinstance(x, fx.Node) or any(isinstance(a, fx.Node) for a in rest):
        return None
    return Secant(node.target, replacement, x, rest)


def _dtype(gm: fx.GraphModule, node: fx.Node) -> torch.dtype:
    """The dtype phi(0) is held in: the input's where the graph records it, else the model's."""
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    if getattr(value, "dtype", None) is not None and value.dtype.is_floating_point:
        return value.dtype
    tensors = (*gm.parameters(), *gm.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())


def _phi0_buffer(graph: fx.Graph, node: fx.Node, payload: Secant) -> fx.Node | None:
    """A get_attr of phi(0) as a 0-dim buffer, or None where phi(0) is 0."""
    gm = graph.owning_module
    value = payload.phi(torch.zeros((), dtype=_dtype(gm, node)), *payload.rest)
    if value.item() == 0:
        return None
    name, i = f"libra_phi0_{node.name}", 0
    while hasattr(gm, name):
        i += 1
        name = f"libra_phi0_{node.name}_{i}"
    gm.register_buffer(name, value.detach())
    with graph.inserting_before(node):
        get = graph.get_attr(name)
    get.meta = dict(node.meta)
    return get


def _replace(graph: fx.Graph, node: fx.Node, payload: Secant) -> str:
    phi0 = _phi0_buffer(graph, node, payload)
    node.target = payload.replacement.target
    node.args, node.kwargs = (payload.x, phi0, *payload.rest), {}
    if phi0 is None:
        return payload.replacement.says
    value = graph.owning_module.get_buffer(phi0.target).item()
    return f"{payload.replacement.says}; phi(0) = {value:.4g}, a bias"


RULE = Rule(
    name="elementwise",
    summary="phi(0) + x * [(phi(x) - phi(0)) / x]cst, phi(0) a bias",
    match=_match,
    replace=_replace,
)
