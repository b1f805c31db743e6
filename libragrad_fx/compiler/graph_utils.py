"""Small helpers shared by the passes: reading arguments, replacing nodes, naming places."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

_UNSET = object()


def arg(node: fx.Node, index: int, name: str, default: Any = _UNSET) -> Any:
    """Argument ``name`` of a call, given positionally at ``index`` or as a keyword."""
    if index < len(node.args):
        return node.args[index]
    if name in node.kwargs:
        return node.kwargs[name]
    if default is _UNSET:
        raise KeyError(f"{node.format_node()} has no argument {name!r}")
    return default


def module_path(node: fx.Node) -> str:
    """The qualified name of the innermost module the node was traced in ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.target if node.op == "call_module" else ""
    path = next(reversed(stack.values()))[0]
    return str(path)


def insert_call(
    graph: fx.Graph, before: fx.Node, target: Callable, args: tuple, kwargs: dict | None = None
) -> fx.Node:
    """A call_function inserted before ``before`` that inherits its meta (module path)."""
    with graph.inserting_before(before):
        new = graph.call_function(target, args, kwargs or {})
    new.meta = dict(before.meta)
    return new


def replace_with_call(
    graph: fx.Graph, node: fx.Node, target: Callable, args: tuple, kwargs: dict | None = None
) -> fx.Node:
    """Replace ``node`` by a call_function, keeping its users and its meta."""
    new = insert_call(graph, node, target, args, kwargs)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def detach_use(graph: fx.Graph, user: fx.Node, value: fx.Node) -> fx.Node:
    """Make ``user`` read ``cst(value)`` instead of ``value`` (other users keep the gradient)."""
    detached = insert_call(graph, user, torch.detach, (value,))
    user.replace_input_with(value, detached)
    return detached


def is_call(node: Any, *targets: Callable) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def target_name(node: fx.Node) -> str:
    """A short readable name of what a node does (``operator.mul``, ``torch.softmax``)."""
    t = node.target
    if node.op != "call_function":
        return str(t)
    module = "operator" if t in vars(operator).values() else getattr(t, "__module__", None)
    return f"{module}.{t.__name__}" if module else t.__name__
