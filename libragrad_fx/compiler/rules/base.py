"""What a rule is: a pattern over the dataflow, a replacement, and what the report says."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..dataflow import Dataflow
from ..graph_utils import is_call

Matcher = Callable[[fx.Node, Dataflow], Any]
Replacer = Callable[[fx.Graph, fx.Node, Any], str]


@dataclass(frozen=True)
class Rule:
    """One LibraGrad rule.

    ``match(node, flow)`` returns a payload (anything but None) when the node is an instance of
    the pattern; ``replace(graph, node, payload)`` rewrites it and returns the report's words
    for what was detached or scaled. Rules never change a forward value.
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
