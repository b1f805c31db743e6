"""Canonicalisation: one functional vocabulary for module calls, method calls and aliases.

After this pass a GELU is ``F.gelu`` whether the model wrote ``nn.GELU()``, ``F.gelu`` or
``x.gelu()``-style code, so each rule matches one form. Every replacement calls the same kernel
the original called, so the forward stays bit-identical. Eval-mode no-ops (Dropout, Identity,
functional dropout with training=False, in place or not) are removed.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..runtime import mha, ops
from . import optable
from .graph_utils import arg, replace_with_call

# Tensor methods and function aliases that become one canonical function (same kernel, same
# arguments, self first): the op table's ``methods`` and ``aliases`` spellings.
_METHODS: dict[str, Callable] = optable.canonical_methods()
_ALIASES: dict[Callable, Callable] = optable.aliases()
# One-input modules without parameters that become the function they run.
_SIMPLE_MODULES: dict[type, Callable] = optable.module_spellings()
_MODULE_ARGS: dict[type, tuple[str, ...]] = optable.module_arguments()  # alpha=, beta=, ...
# Arithmetic is canonicalised only in its plain two-operand form (no alpha=, rounding_mode=).
_BINARY = (operator.mul, operator.matmul, operator.add, operator.sub, operator.truediv)
_EVAL_NOOPS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
# Functional dropout, out of place or in place, is its input when ``training`` is False or p
# is 0 (the in-place form then leaves it as it is). Their ``training`` defaults differ
# (F.dropout: True, F.alpha_dropout: False), so each is read from the signature.
_DROPOUT_TRAINING_DEFAULT = {
    f: inspect.signature(f).parameters["training"].default
    for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
              F.feature_alpha_dropout)
}


def _params(graph: fx.Graph, node: fx.Node, module: nn.Module, *names: str, sub: str = "") -> list:
    """get_attr nodes for the parameters or buffers of ``module`` (None where it has none).

    ``module`` is the called module or its child ``sub``.
    """
    prefix = f"{node.target}.{sub}" if sub else node.target
    out = []
    with graph.inserting_before(node):
        for name in names:
            if getattr(module, name, None) is None:
                out.append(None)
            else:
                get = graph.get_attr(f"{prefix}.{name}")
                get.meta = dict(node.meta)
                out.append(get)
    return out


def _own_forward(module: nn.Module, base: type) -> bool:
    """True when ``module`` runs ``base``'s forward (a subclass may override it)."""
    return isinstance(module, base) and type(module).forward is base.forward


def _is_eval_batch_norm(m: nn.Module) -> bool:
    """An eval BatchNorm that normalises by its running statistics: an affine map.

    In training mode, or without running statistics, it normalises by the batch's own
    statistics and stays a module (uncovered, so the certificate names it).
    """
    return (
        any(_own_forward(m, cls) for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
        and not m.training
        and m.running_mean is not None
        and m.running_var is not None
    )


def _inactive_dropout(node: fx.Node) -> bool:
    """A functional dropout call that returns its input as it is (eval, or p = 0)."""
    if node.op != "call_function" or node.target not in _DROPOUT_TRAINING_DEFAULT:
        return False
    training = arg(node, 2, "training", _DROPOUT_TRAINING_DEFAULT[node.target])
    return training is False or arg(node, 1, "p", 0.5) == 0


def _module_call(graph: fx.Graph, node: fx.Node, m: nn.Module) -> tuple | None:
    """(target, args, kwargs) of the functional form of a leaf module call, or None."""
    if _own_forward(m, nn.Bilinear) and len(node.args) == 2 and not node.kwargs:
        return torch.bilinear, (*node.args, *_params(graph, node, m, "weight", "bias")), {}
    if node.kwargs or len(node.args) != 1:
        return _mha_call(graph, node, m) if _own_forward(m, nn.MultiheadAttention) else None
    x = node.args[0]
    if _own_forward(m, nn.Linear):
        return F.linear, (x, *_params(graph, node, m, "weight", "bias")), {}
    for conv, fn in ((nn.Conv1d, F.conv1d), (nn.Conv2d, F.conv2d), (nn.Conv3d, F.conv3d)):
        if _own_forward(m, conv) and m.padding_mode == "zeros":
            w, b = _params(graph, node, m, "weight", "bias")
            return fn, (x, w, b, m.stride, m.padding, m.dilation, m.groups), {}
    if _own_forward(m, nn.LayerNorm):
        w, b = _params(graph, node, m, "weight", "bias")
        return F.layer_norm, (x, tuple(m.normalized_shape), w, b, m.eps), {}
    if _own_forward(m, nn.GroupNorm):
        w, b = _params(graph, node, m, "weight", "bias")
        return F.group_norm, (x, m.num_groups, w, b, m.eps), {}
    if _is_eval_batch_norm(m):
        mean, var, w, b = _params(graph, node, m, "running_mean", "running_var", "weight", "bias")
        return F.batch_norm, (x, mean, var, w, b, False, 0.0, m.eps), {}
    if _own_forward(m, nn.RMSNorm):
        (w,) = _params(graph, node, m, "weight")
        return F.rms_norm, (x, tuple(m.normalized_shape), w, m.eps), {}
    if _own_forward(m, nn.GELU):
        return F.gelu, (x,), {"approximate": m.approximate}
    for cls, fn in _SIMPLE_MODULES.items():
        if _own_forward(m, cls):
            return fn, (x, *(getattr(m, a) for a in _MODULE_ARGS.get(cls, ()))), {}
    if _own_forward(m, nn.GLU):
        return F.glu, (x, m.dim), {}
    if _own_forward(m, nn.Softmax) and m.dim is not None:
        return torch.softmax, (x, m.dim), {}
    return None


def _mha_call(graph: fx.Graph, node: fx.Node, m: nn.MultiheadAttention) -> tuple:
    """mha.multihead_attention: the module's call with its parameters visible to the dataflow."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")
    call = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    with graph.inserting_before(node):
        module = graph.get_attr(node.target)
    module.meta = dict(node.meta)
    w_in, b_in = _params(graph, node, m, "in_proj_weight", "in_proj_bias")
    w_out, b_out = _params(graph, node, m.out_proj, "weight", "bias", sub="out_proj")
    # Separate q/k/v projections (kdim or vdim != embed_dim) come last, only where they exist.
    separate = [] if m._qkv_same_embed_dim else _params(
        graph, node, m, "q_proj_weight", "k_proj_weight", "v_proj_weight")
    q, k, v = call.pop("query"), call.pop("key"), call.pop("value")
    params = (w_in, b_in, w_out, b_out, *separate)
    return mha.multihead_attention, (module, q, k, v, *params), call


def _contiguous_batch_norm_grads(graph: fx.Graph) -> None:
    """Route the gradient into every eval batch norm through ``ops.contiguous_grad``.

    PyTorch's CPU eval batch-norm backward returns a wrong input gradient for a batch of one
    when the incoming gradient has channels-last strides with an odd batch stride (as after
    ``y.flatten(2).transpose(1, 2)``); a contiguous gradient avoids it. The forward is the
    same tensor.
    """
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is F.batch_norm and not arg(
                node, 5, "training", False):
            with graph.inserting_after(node):
                wrapped = graph.call_function(ops.contiguous_grad, (node,))
            wrapped.meta = dict(node.meta)
            node.replace_all_uses_with(wrapped, delete_user_cb=lambda u, w=wrapped: u is not w)


def _delete_unused_submodules(gm: fx.GraphModule) -> None:
    """Delete the submodules no node refers to, keeping everything under one that is.

    ``GraphModule.delete_all_unused_submodules`` keeps only the paths the root graph names, so
    it deletes the children of a referenced subgraph (a higher-order op's nested block) and
    the graph then fails to run; here a referenced module keeps all it holds.
    """
    used = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for name in [name for name, _ in gm.named_modules() if name]:
        keep = any(name == u or name.startswith(f"{u}.") or u.startswith(f"{name}.")
                   for u in used)
        if not keep:
            gm.delete_submodule(name)


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm`` in place into the canonical vocabulary and return it."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and "out" in node.kwargs and node.kwargs["out"] is None:
            # ``out=None`` is the default (F.normalize passes it on): it writes nothing in place.
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "out"}
        if _inactive_dropout(node):
            node.replace_all_uses_with(arg(node, 0, "input"))
            graph.erase_node(node)
            continue
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            noop = isinstance(m, nn.Identity) or (isinstance(m, _EVAL_NOOPS) and not m.training)
            if noop and len(node.args) == 1 and not node.kwargs:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                continue
            call = _module_call(graph, node, m)
            if call is not None:
                replace_with_call(graph, node, *call)
        elif node.op == "call_method" and node.target in _METHODS:
            target = _METHODS[node.target]
            if target not in _BINARY or (len(node.args) == 2 and not node.kwargs):
                replace_with_call(graph, node, target, node.args, node.kwargs)
        elif node.op == "call_function" and node.target is F.softmax:
            dim, dtype = arg(node, 1, "dim", None), arg(node, 3, "dtype", None)
            if dim is not None:
                extra = {} if dtype is None else {"dtype": dtype}
                replace_with_call(graph, node, torch.softmax, (arg(node, 0, "input"), dim), extra)
        elif node.op == "call_function" and node.target in _ALIASES:
            target = _ALIASES[node.target]
            if target not in _BINARY or (len(node.args) == 2 and not node.kwargs):
                replace_with_call(graph, node, target, node.args, node.kwargs)
    _contiguous_batch_norm_grads(graph)
    graph.eliminate_dead_code()
    graph.lint()
    _delete_unused_submodules(gm)
    gm.recompile()
    return gm
