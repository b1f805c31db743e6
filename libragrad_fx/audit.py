"""Find the ops on the gradient path that no rule made complete.

An op passes when it is known to be linear or piecewise linear in its gradient-carrying inputs
(an allow-list: reshapes, sums, linear layers, ReLU, pooling, products with at most one
input-dependent factor, and the rules' own operators). Everything else that still carries input
gradient to the output is listed, because it would make an explanation unfaithful without
anyone noticing; strict mode refuses the graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import mha, ops
from .dataflow import Dataflow
from .graph_utils import arg, module_path, target_name

_LINEAR_FUNCTIONS = {
    operator.add, operator.sub, operator.neg, operator.pos, operator.getitem,
    torch.add, torch.sub, torch.neg, torch.cat, torch.concat, torch.stack, torch.flatten,
    torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.roll,
    torch.flip, torch.chunk, torch.split, torch.unbind, torch.narrow, torch.sum, torch.mean,
    torch.cumsum, torch.where, torch.clone, torch.gather, torch.index_select, torch.tile,
    torch.repeat_interleave, torch.relu, F.relu, F.leaky_relu, F.linear, F.conv1d, F.conv2d,
    F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.pad, F.max_pool1d, F.max_pool2d,
    F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.dropout, F.interpolate, F.pixel_shuffle,
    F.unfold, F.fold, F.embedding, torch._assert,
    ops.libra_gelu, ops.libra_silu, ops.libra_layer_norm, ops.libra_rms_norm,
    ops.libra_normalize, ops.shared_product, mha.libra_multihead_attention,
}
_LINEAR_METHODS = {
    "view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "expand",
    "expand_as", "repeat", "squeeze", "unsqueeze", "to", "type_as", "float", "half",
    "bfloat16", "double", "mean", "sum", "chunk", "split", "unbind", "narrow", "select",
    "roll", "flip", "clone", "view_as", "reshape_as", "masked_fill", "index_select", "gather",
    "cumsum", "relu", "t", "neg", "add", "sub", "tile", "repeat_interleave",
}
# Products: linear while at most one operand carries input gradient (and never the divisor).
_PRODUCTS = {operator.mul, operator.matmul, torch.bmm, torch.baddbmm, torch.einsum}
# Leaf modules that are affine or piecewise linear in eval mode.
_LINEAR_MODULES = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.BatchNorm1d,
    nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Flatten, nn.Unflatten, nn.ZeroPad2d, nn.Embedding,
)


@dataclass(frozen=True)
class Untouched:
    """An op on the gradient path that no rule covered."""

    node: str
    module: str
    op: str
    why: str


def _why(gm: fx.GraphModule, node: fx.Node, flow: Dataflow) -> str | None:
    """Why ``node`` (which carries input gradient to the output) breaks completeness, or None."""
    if node.op in ("placeholder", "get_attr", "output"):
        return None
    if node.op == "call_module":
        if isinstance(gm.get_submodule(node.target), _LINEAR_MODULES):
            return None
        return "module not analysed (no functional form and not known to be linear)"
    target = node.target
    if node.op == "call_method":
        return None if target in _LINEAR_METHODS else "nonlinear or unknown method, no rule"
    if target is F.scaled_dot_product_attention:
        q, k = arg(node, 0, "query"), arg(node, 1, "key")
        if flow.depends_on_input(q) or flow.depends_on_input(k):
            return "attention with input-dependent q or k"
        return None
    if target is operator.truediv:
        return "division by an input-dependent tensor" if flow.depends_on_input(
            node.args[1]) else None
    if target in _PRODUCTS:
        if sum(flow.depends_on_input(a) for a in node.all_input_nodes) >= 2:
            return "product of input-dependent tensors with no rule"
        return None
    return None if target in _LINEAR_FUNCTIONS else "nonlinear or unknown op, no rule"


def untouched_ops(gm: fx.GraphModule, flow: Dataflow) -> list[Untouched]:
    """Every node that carries input gradient to the output through an uncovered op."""
    found = []
    for node in gm.graph.nodes:
        if not flow.needs_rule(node):
            continue
        why = _why(gm, node, flow)
        if why is not None:
            op = (type(gm.get_submodule(node.target)).__name__ if node.op == "call_module"
                  else target_name(node))
            found.append(Untouched(node.name, module_path(node), op, why))
    return found
