"""Self-gating rule: a product of n input-dependent factors gives each factor 1/n.

Matches the products left after the other rules (SwiGLU, GeGLU, GluMlp: act(xW1) * (xW2)). A
left-nested chain ((a*b)*c) is one product of three factors; its forward is computed in the
same order, so it stays bit-identical. A square (the same tensor twice) is one branch, not a
gate: it is left to the certificate, since what follows it often restores the degree
(sqrt(h*h), h*h/h) and sharing its gradient would break that.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from ..dataflow import Dataflow
from ..graph_utils import is_call
from ..opspec import Replacement
from .base import Rule, libra_form


@dataclass(frozen=True)
class Factors:
    """A product chain of input-dependent ``factors`` and the op that shares its gradient."""

    factors: tuple[fx.Node, ...]
    replacement: Replacement


def _is_gating_product(node, flow: Dataflow) -> bool:
    return (
        is_call(node, operator.mul)
        and len(node.args) == 2
        and node.args[0] is not node.args[1]
        and all(flow.depends_on_input(a) for a in node.args)
    )


def _factors(node: fx.Node, flow: Dataflow) -> list[fx.Node]:
    left, right = node.args
    if _is_gating_product(left, flow) and len(left.users) == 1:
        return [*_factors(left, flow), right]
    return [left, right]


def _match(node: fx.Node, flow: Dataflow):
    if not flow.needs_rule(node) or not _is_gating_product(node, flow):
        return None
    (user,) = node.users if len(node.users) == 1 else (None,)
    if user is not None and _is_gating_product(user, flow) and user.args[0] is node:
        return None  # the outer product of the chain takes this one in
    return Factors(tuple(_factors(node, flow)), libra_form(node, "self_gating"))


def _replace(graph: fx.Graph, node: fx.Node, payload: Factors) -> str:
    count = len(payload.factors)
    node.target, node.args, node.kwargs = payload.replacement.target, payload.factors, {}
    return f"product of {count} input-dependent factors, 1/{count} each"


RULE = Rule(
    name="self_gating",
    summary="shared_product(a, b, ...): each of n factors gets 1/n of the gradient",
    match=_match,
    replace=_replace,
)
