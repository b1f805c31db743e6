"""Attention rule: the attention probabilities are constants; gradient flows through V only.

Forms: fused ``scaled_dot_product_attention`` (q and k detached, the fused kernel kept), an
explicit ``softmax(...) @ V`` (scale, mask and dropout in between are looked through), and
``nn.MultiheadAttention`` (canonicalised to ``mha.multihead_attention``).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import mha
from ..dataflow import Dataflow
from ..graph_utils import arg, detach_use, is_call
from .base import Rule, through_passthrough

_MATMULS = (operator.matmul, torch.bmm, torch.matmul)


def _match(node: fx.Node, flow: Dataflow):
    if not flow.needs_rule(node):
        return None
    if is_call(node, F.scaled_dot_product_attention):
        q, k = arg(node, 0, "query"), arg(node, 1, "key")
        return "sdpa" if flow.depends_on_input(q) or flow.depends_on_input(k) else None
    if is_call(node, mha.multihead_attention):
        module = node.args[0]
        owner = module.graph.owning_module.get_submodule(module.target)
        return "mha" if mha.supports_libra_attention(owner, node.kwargs) else None
    if is_call(node, *_MATMULS) and len(node.args) == 2:
        for i, operand in enumerate(node.args):
            other = node.args[1 - i]
            source = through_passthrough(operand)
            if (
                is_call(source, torch.softmax)
                and flow.depends_on_input(source)
                and flow.depends_on_input(other)
            ):
                return i
    return None


def _replace(graph: fx.Graph, node: fx.Node, payload) -> str:
    if payload == "sdpa":
        for value in dict.fromkeys((arg(node, 0, "query"), arg(node, 1, "key"))):
            if isinstance(value, fx.Node):
                detach_use(graph, node, value)
        return "q, k detached; fused kernel kept"
    if payload == "mha":
        node.target = mha.libra_multihead_attention
        return "attention probabilities constant (q, k detached)"
    detach_use(graph, node, node.args[payload])
    return "softmax probabilities constant"


RULE = Rule(
    name="attention",
    summary="[softmax(QK^T/sqrt(d) + mask)]cst . V",
    match=_match,
    replace=_replace,
)
