"""Find the nonlinear ops that no rule rewrote and that still sit on the gradient path.

These are what would make an explanation unfaithful without anyone noticing, so the report
lists every one, and strict mode refuses the graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import ops
from .dataflow import Dataflow
from .graph_utils import arg, module_path, target_name

# Ops that are nonlinear in their input (complete only on constant inputs).
_NONLINEAR_FUNCTIONS = {
    F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.softplus, F.elu, F.selu, F.celu,
    F.glu, F.logsigmoid, F.log_softmax, F.layer_norm, F.rms_norm, F.group_norm,
    F.instance_norm, F.normalize, F.scaled_dot_product_attention, ops.multihead_attention,
    torch.sigmoid, torch.tanh, torch.softmax, torch.exp, torch.log, torch.erf, torch.sqrt,
    torch.rsqrt, torch.reciprocal, torch.pow, operator.pow, torch.sin, torch.cos,
    torch.norm, torch.linalg.vector_norm, torch.std, torch.var,
}
_NONLINEAR_METHODS = {
    "softmax", "log_softmax", "sigmoid", "tanh", "exp", "log", "erf", "sqrt", "rsqrt",
    "reciprocal", "pow", "norm", "std", "var", "sin", "cos",
}
# Leaf modules that are affine or piecewise linear in eval mode, so need no rule.
_SAFE_MODULES = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.BatchNorm1d,
    nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Flatten, nn.Unflatten, nn.ZeroPad2d, nn.Embedding,
)
_PRODUCTS = (operator.mul, operator.matmul, torch.bmm, operator.truediv)


@dataclass(frozen=True)
class Untouched:
    """A nonlinear op on the gradient path that no rule covered."""

    node: str
    module: str
    op: str
    why: str


def _why(gm: fx.GraphModule, node: fx.Node, flow: Dataflow) -> str | None:
    if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
        # Linear in v once q and k are constants (the attention rule's form).
        q, k = arg(node, 0, "query"), arg(node, 1, "key")
        if flow.depends_on_input(q) or flow.depends_on_input(k):
            return "attention with input-dependent q or k"
        return None
    if node.op == "call_function" and node.target in _NONLINEAR_FUNCTIONS:
        return "nonlinear op with no rule for this use"
    if node.op == "call_method" and node.target in _NONLINEAR_METHODS:
        return "nonlinear method with no rule for this use"
    if node.op == "call_function" and node.target in _PRODUCTS:
        tensors = [a for a in node.args if flow.depends_on_input(a)]
        if len(tensors) >= 2:
            return "product of input-dependent tensors with no rule"
    if node.op == "call_module":
        if not isinstance(gm.get_submodule(node.target), _SAFE_MODULES):
            return "module not analysed (no functional form and not known to be linear)"
    return None


def untouched_ops(gm: fx.GraphModule, flow: Dataflow) -> list[Untouched]:
    """Every node that still breaks completeness for all the rules know."""
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
