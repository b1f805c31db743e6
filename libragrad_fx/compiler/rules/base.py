"""What a rule is: a pattern over the dataflow, a replacement, and what the report says."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import optable
from ..dataflow import Dataflow
from ..graph_utils import arg, is_call
from ..opspec import Replacement

Matcher = Callable[[fx.Node, Dataflow], Any]
Replacer = Callable[[fx.Graph, fx.Node, Any], str]


@dataclass(frozen=True)
class Rule:
    """One LibraGrad rule.

    ``match(node, flow)`` returns a payload (one of the rule's own small dataclasses, saying
    which form matched) when the node is an instance of the pattern, else None;
    ``replace(graph, node, payload)`` rewrites it and returns the report's words for what was
    detached or scaled. Rules never change a forward value.
    """

    name: str
    summary: str
    match: Matcher
    replace: Replacer


# Ops that only move, cast or reshape values: patterns look through them.
_PASSTHROUGH_METHODS = {
    "to", "type_as", "contiguous", "view", "reshape", "transpose", "permute", "squeeze",
    "unsqueeze", "expand", "expand_as", "flatten", "float", "half", "bfloat16", "clone",
}
_PASSTHROUGH_FUNCTIONS = {F.dropout, torch.transpose, torch.permute, torch.reshape, torch.squeeze,
                          torch.unsqueeze, torch.flatten, torch.clone}


def is_passthrough(node: Any) -> bool:
    """True for a reshape, cast or (eval) dropout of its first argument."""
    return isinstance(node, fx.Node) and bool(node.args) and (
        (node.op == "call_method" and node.target in _PASSTHROUGH_METHODS)
        or is_call(node, *_PASSTHROUGH_FUNCTIONS)
    )


def through_passthrough(value: Any) -> Any:
    """Follow ``value`` back through reshapes, casts and (eval) dropout to its producer."""
    while is_passthrough(value):
        value = value.args[0]
    return value


@dataclass(frozen=True)
class Swap:
    """A payload: the matched op is swapped for its op-table Libra form, nothing else."""

    replacement: Replacement


def libra_form(node: fx.Node, rule: str) -> Replacement | None:
    """The op-table replacement that ``rule`` makes for what ``node`` calls, if any."""
    op = optable.call_record(node)
    replacement = op.libra if op is not None else None
    return replacement if replacement is not None and replacement.rule == rule else None


def swap(node: fx.Node, replacement: Replacement) -> str:
    """Point ``node`` at the replacement, its arguments rebound as the record says; the
    report's words."""
    if replacement.args:
        bound = tuple(arg(node, b.index, b.name) if b.required else
                      arg(node, b.index, b.name, b.default) for b in replacement.args)
        node.args, node.kwargs = bound, {}
    node.target = replacement.target
    says = replacement.says
    return says(*node.args) if callable(says) else says
