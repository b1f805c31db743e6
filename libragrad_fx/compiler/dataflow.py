"""A networkx view of a graph's dataflow: what carries gradient from the input, what is live.

Rules match on this view rather than on module names: a softmax matters only if its input
depends on the model input and its output reaches the model output through the gradient.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from . import optable
from .opspec import Op, Reads


def _call_record(node: fx.Node) -> Op | None:
    """The record of a function or method call (module calls read every input)."""
    return optable.of_node(node) if node.op in ("call_function", "call_method") else None


def _first(node: fx.Node) -> list[fx.Node]:
    return [node.args[0]] if isinstance(node.args[0], fx.Node) else []


def gradient_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs of ``node`` through which gradient can reach its value."""
    op = _call_record(node)
    if op is not None and not op.gradient:
        return []
    if op is not None and op.reads is Reads.FIRST:
        return _first(node)
    return list(node.all_input_nodes)


def value_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values (not only shapes) ``node`` reads, gradient or not."""
    op = _call_record(node)
    if op is not None and op.reads is Reads.SHAPES:
        return []
    if op is not None and op.reads is Reads.FIRST:
        return _first(node)
    return list(node.all_input_nodes)


def _is_input(node: fx.Node) -> bool:
    """A placeholder that the caller fills (not an optional argument defaulting to None)."""
    return node.op == "placeholder" and not (node.args and node.args[0] is None)


@dataclass(frozen=True)
class Dataflow:
    """Which nodes carry gradient from the inputs, which read the inputs' values at all
    (through detach or comparisons too), and which reach the output."""

    graph: nx.DiGraph
    from_input: frozenset[fx.Node]
    live: frozenset[fx.Node]
    reads: frozenset[fx.Node]

    @classmethod
    def of(cls, gm: fx.GraphModule) -> Dataflow:
        g = nx.DiGraph()
        output = None
        for node in gm.graph.nodes:
            g.add_node(node, op=node.op, kind=_kind(gm, node))
            g.add_edges_from((src, node) for src in gradient_inputs(node))
            if node.op == "output":
                output = node
        inputs = {n for n in g if _is_input(n)}
        from_input = set(inputs).union(*(nx.descendants(g, n) for n in inputs))
        live = nx.ancestors(g, output) | {output} if output is not None else set()
        reads: set[fx.Node] = set()
        for node in gm.graph.nodes:
            if _is_input(node) or any(v in reads for v in value_inputs(node)):
                reads.add(node)
        return cls(g, frozenset(from_input), frozenset(live), frozenset(reads))

    def depends_on_input(self, value: Any) -> bool:
        """True for a node whose value carries gradient from a model input."""
        return isinstance(value, fx.Node) and value in self.from_input

    def reads_input(self, value: Any) -> bool:
        """True for a node whose value is computed from a model input's values."""
        return isinstance(value, fx.Node) and value in self.reads

    def constant_sources(self, value: fx.Node) -> tuple[str, ...]:
        """The attributes (parameters, buffers, tensor constants) a constant is computed from,
        following values only: shapes read from the input do not count."""
        seen, stack, found = set(), [value], set()
        while stack:
            node = stack.pop()
            if node in seen or self.reads_input(node):
                continue
            seen.add(node)
            if node.op == "get_attr" and self.graph.nodes[node]["kind"] != "constant":
                found.add(str(node.target))
            stack.extend(value_inputs(node))
        return tuple(sorted(found))

    def needs_rule(self, node: fx.Node) -> bool:
        """True when the node carries input gradient that reaches the output."""
        return node in self.from_input and node in self.live


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op != "get_attr":
        return "op"
    value = operator.attrgetter(node.target)(gm)
    if isinstance(value, torch.nn.Parameter):
        return "parameter"
    return "buffer" if isinstance(value, torch.Tensor) else "constant"

