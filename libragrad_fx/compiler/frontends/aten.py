"""ATen -> canonical vocabulary, for graphs that come from torch.export.

torch.export records ATen operators (``aten.linear``, ``aten.gelu``); the rules and the audit
match the functional forms symbolic tracing gives (``F.linear``, ``F.gelu``). Each replacement
below calls the same ATen kernel with the same arguments, so the forward stays bit-identical.
An operator that is not listed stays as it is: the audit then reports it as an unknown op,
which is the honest answer.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten

# Torch functions whose Python signature binds exactly like the ATen schema: args pass through.
_FUNCTIONS: dict[Any, Callable] = {
    aten.linear.default: F.linear,
    aten.conv1d.default: F.conv1d, aten.conv2d.default: F.conv2d, aten.conv3d.default: F.conv3d,
    aten.conv1d.padding: F.conv1d, aten.conv2d.padding: F.conv2d, aten.conv3d.padding: F.conv3d,
    aten.rms_norm.default: F.rms_norm,
    aten.silu.default: F.silu,
    aten.leaky_relu.default: F.leaky_relu, aten.hardtanh.default: F.hardtanh,
    aten.hardswish.default: F.hardswish, aten.hardsigmoid.default: F.hardsigmoid,
    aten.softplus.default: F.softplus, aten.mish.default: F.mish,
    aten.selu.default: F.selu, aten.celu.default: F.celu, aten.relu6.default: F.relu6,
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
    aten.max_pool1d.default: F.max_pool1d, aten.max_pool2d.default: F.max_pool2d,
    aten.avg_pool1d.default: F.avg_pool1d, aten.avg_pool2d.default: F.avg_pool2d,
    aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.pad.default: F.pad,
    aten.sigmoid.default: torch.sigmoid, aten.tanh.default: torch.tanh,
    aten.exp.default: torch.exp, aten.log.default: torch.log, aten.erf.default: torch.erf,
    aten.sqrt.default: torch.sqrt, aten.rsqrt.default: torch.rsqrt, aten.relu.default: torch.relu,
    aten.reciprocal.default: torch.reciprocal, aten.abs.default: torch.abs,
    aten.neg.default: operator.neg, aten.detach.default: torch.detach,
    aten.softmax.int: torch.softmax, aten.log_softmax.int: torch.log_softmax,
    aten.mul.Tensor: operator.mul, aten.mul.Scalar: operator.mul,
    aten.div.Tensor: operator.truediv, aten.div.Scalar: operator.truediv,
    aten.matmul.default: operator.matmul, aten.mm.default: operator.matmul,
    aten.bmm.default: torch.bmm, aten.baddbmm.default: torch.baddbmm,
    aten.addmm.default: torch.addmm, aten.addmv.default: torch.addmv,
    aten.addbmm.default: torch.addbmm, aten.bilinear.default: torch.bilinear,
    aten.mean.dim: torch.mean, aten.mean.default: torch.mean,
    aten.sum.dim_IntList: torch.sum, aten.sum.default: torch.sum,
    aten.var.correction: torch.var, aten.std.correction: torch.std,
    aten.pow.Tensor_Scalar: torch.pow, aten.pow.Tensor_Tensor: torch.pow,
    aten.pow.Scalar: torch.pow,
    aten.clamp.default: torch.clamp, aten.clamp.Tensor: torch.clamp,
    aten.clamp_min.default: torch.clamp_min,
    aten.linalg_vector_norm.default: torch.linalg.vector_norm,
    aten.cat.default: torch.cat, aten.stack.default: torch.stack,
    aten.unbind.int: torch.unbind, aten.chunk.default: torch.chunk,
    aten.split.Tensor: torch.split, aten.split_with_sizes.default: torch.split,
    aten.narrow.default: torch.narrow, aten.where.self: torch.where,
    aten.gather.default: torch.gather, aten.index_select.default: torch.index_select,
    aten.roll.default: torch.roll, aten.flip.default: torch.flip,
    aten.cumsum.default: torch.cumsum,
    aten.repeat_interleave.self_int: torch.repeat_interleave,
    aten.zeros_like.default: torch.zeros_like, aten.ones_like.default: torch.ones_like,
    aten.argmax.default: torch.argmax, aten.argmin.default: torch.argmin,
    aten.amax.default: torch.amax, aten.amin.default: torch.amin,
    aten.max.dim: torch.max, aten.min.dim: torch.min, aten.max.default: torch.max,
    aten.min.default: torch.min, aten.maximum.default: torch.maximum,
    aten.minimum.default: torch.minimum,
}
# Tensor methods that bind like the ATen schema (self first).
_METHODS: dict[Any, str] = {
    aten.view.default: "view", aten.reshape.default: "reshape",
    aten._unsafe_view.default: "reshape",
    aten.permute.default: "permute", aten.transpose.int: "transpose", aten.t.default: "t",
    aten.swapaxes.default: "swapaxes", aten.swapdims.default: "swapdims",
    aten.unsqueeze.default: "unsqueeze", aten.squeeze.default: "squeeze",
    aten.squeeze.dim: "squeeze", aten.squeeze.dims: "squeeze",
    aten.expand_as.default: "expand_as", aten.reshape_as.default: "reshape_as",
    aten.view_as.default: "view_as", aten.flatten.using_ints: "flatten",
    aten.unflatten.int: "unflatten", aten.select.int: "select", aten.repeat.default: "repeat",
    aten.contiguous.default: "contiguous", aten.clone.default: "clone",
    aten.lift_fresh_copy.default: "clone", aten.type_as.default: "type_as",
    aten.to.dtype: "to", aten.to.device: "to", aten.masked_fill.Scalar: "masked_fill",
    aten.masked_fill.Tensor: "masked_fill", aten.sym_size.int: "size",
    aten.new_zeros.default: "new_zeros", aten.new_ones.default: "new_ones",
    aten.detach_.default: "detach_",
}
# Comparisons (they carry no gradient): the Python operator runs the same ATen op.
_COMPARISONS = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
                "gt": operator.gt, "ge": operator.ge}
_FUNCTIONS.update({getattr(aten, name).Tensor: op for name, op in _COMPARISONS.items()})
_FUNCTIONS.update({getattr(aten, name).Scalar: op for name, op in _COMPARISONS.items()})
# Eval-mode no-ops (dropout with train=False, out of place or in place: dropout_ then leaves
# its input as it is and returns it) and aliases: the node becomes its input.
_DROPOUTS = tuple(getattr(aten, name + suffix).default for name in (
    "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout") for suffix in ("", "_"))
_PASSTHROUGH = (aten.alias.default,)
# Checks of dtype and device baked in at export time; they would pin the graph to them.
_METADATA_ASSERTS = (aten._assert_tensor_metadata.default,)
_INTERPOLATE = {aten.upsample_nearest2d.vec: "nearest", aten.upsample_bilinear2d.vec: "bilinear",
                aten.upsample_bicubic2d.vec: "bicubic"}
_NO_END = sys.maxsize  # what ATen's slice records for an open end

Call = tuple[str, Any, tuple, dict]


def bind(node: fx.Node) -> dict[str, Any]:
    """The ATen call's arguments by schema name, defaults filled in."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _fn(target: Callable, *args: Any, **kwargs: Any) -> Call:
    return "call_function", target, args, kwargs


def _index(dim: int, item: Any) -> tuple:
    """The getitem key that applies ``item`` along ``dim`` (negative dims from the end)."""
    if dim >= 0:
        return (*(slice(None),) * dim, item)
    return (Ellipsis, item, *(slice(None),) * (-dim - 1))


def _arith(a: dict, target: Callable, fallback: Callable, swap: bool = False) -> Call:
    x, y = (a["other"], a["self"]) if swap else (a["self"], a["other"])
    if a.get("alpha", 1) == 1:
        return _fn(target, x, y)
    return _fn(fallback, x, y, alpha=a["alpha"])


def _special(node: fx.Node) -> Call | None:
    """Operators whose canonical form takes its arguments in another order or shape."""
    t, a = node.target, bind(node)
    if t in (aten.add.Tensor, aten.add.Scalar):
        return _arith(a, operator.add, torch.add)
    if t in (aten.sub.Tensor, aten.sub.Scalar):
        return _arith(a, operator.sub, torch.sub)
    if t in (aten.rsub.Tensor, aten.rsub.Scalar):
        return _arith(a, operator.sub, torch.sub, swap=True)
    if t is aten.elu.default and a["scale"] == 1 and a["input_scale"] == 1:
        return _fn(F.elu, a["self"], a["alpha"])
    if t is aten.gelu.default:
        return _fn(F.gelu, a["self"], approximate=a["approximate"])
    if t is aten._softmax.default and not a["half_to_float"]:
        return _fn(torch.softmax, a["self"], a["dim"])
    if t is aten.layer_norm.default:  # cudnn_enable left out: F.layer_norm sets it itself
        return _fn(F.layer_norm, a["input"], a["normalized_shape"], a["weight"], a["bias"],
                   a["eps"])
    if t is aten.group_norm.default:
        return _fn(F.group_norm, a["input"], a["num_groups"], a["weight"], a["bias"], a["eps"])
    if t is aten.batch_norm.default:
        return _fn(F.batch_norm, a["input"], a["running_mean"], a["running_var"], a["weight"],
                   a["bias"], a["training"], a["momentum"], a["eps"])
    if t is aten.mT.default:
        return "call_method", "transpose", (a["self"], -2, -1), {}
    if t is aten.expand.default:
        return "call_method", "expand", (a["self"], a["size"]), {}
    if t is aten.slice.Tensor:
        end = None if isinstance(a["end"], int) and a["end"] >= _NO_END else a["end"]
        key = _index(a["dim"], slice(a["start"], end, a["step"]))
        return _fn(operator.getitem, a["self"], key)
    if t is aten.index.Tensor:
        key = tuple(slice(None) if i is None else i for i in a["indices"])
        return _fn(operator.getitem, a["self"], key)
    if t is aten.embedding.default and not (a["scale_grad_by_freq"] or a["sparse"]):
        padding = None if a["padding_idx"] == -1 else a["padding_idx"]
        return _fn(F.embedding, a["indices"], a["weight"], padding)
    if t is aten.einsum.default and a["path"] is None and len(a["tensors"]) <= 2:
        return _fn(torch.einsum, a["equation"], *a["tensors"])
    if t in (aten._to_copy.default, aten.to.dtype_layout) and a["layout"] in (
            None, torch.strided) and not a["pin_memory"]:
        keep = {k: a[k] for k in ("dtype", "device", "non_blocking", "memory_format") if a[k]}
        copy = t is aten._to_copy.default or a["copy"]
        return "call_method", "to", (a["self"],), {**keep, "copy": copy}
    if t in _INTERPOLATE and a["output_size"] is not None and a["scale_factors"] is None:
        extra = {} if "align_corners" not in a else {"align_corners": a["align_corners"]}
        return _fn(F.interpolate, a["input"], size=a["output_size"], mode=_INTERPOLATE[t], **extra)
    return None


def _eval_batch_norm(graph: fx.Graph, node: fx.Node) -> bool:
    """``_native_batch_norm_legit_no_training(...)[0]`` -> ``F.batch_norm(..., training=False)``."""
    users = list(node.users)
    if not users or any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
        return False
    a = bind(node)
    for user in users:
        with graph.inserting_before(user):
            new = graph.call_function(F.batch_norm, (
                a["input"], a["running_mean"], a["running_var"], a["weight"], a["bias"], False,
                a["momentum"], a["eps"]))
        new.meta = dict(user.meta)
        user.replace_all_uses_with(new)
        graph.erase_node(user)
    graph.erase_node(node)
    return True


def translate(node: fx.Node) -> Call | str | None:
    """The canonical call for an ATen node; "input" (it is its input), "drop", or None (keep)."""
    t = node.target
    if t in _FUNCTIONS:
        return "call_function", _FUNCTIONS[t], node.args, dict(node.kwargs)
    if t in _METHODS:
        return "call_method", _METHODS[t], node.args, dict(node.kwargs)
    if t in _DROPOUTS:
        a = bind(node)
        return "input" if not a["train"] or a["p"] == 0 else None
    if t in _PASSTHROUGH:
        return "input"
    if t in _METADATA_ASSERTS:
        return "drop"
    return _special(node)


def _fresh(value: Any) -> bool:
    """True for the output of an ATen op that is not a view of its inputs."""
    return (isinstance(value, fx.Node) and value.op == "call_function"
            and isinstance(value.target, torch._ops.OpOverload)
            and all(r.alias_info is None for r in value.target._schema.returns))


def _out_of_place(graph: fx.Graph) -> None:
    """``relu_(x)`` -> ``relu(x)`` where nothing reads x afterwards (as ``inplace=True``
    activations are): same values, and the rules then see the form they know."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        t = node.target
        if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
            continue
        name = t._schema.name.split("::")[-1]
        if not name.endswith("_") or name.endswith("__") or not node.args:
            continue
        twin = getattr(getattr(aten, name[:-1], None), t._overloadname, None)
        x = node.args[0]
        later = any(position[u] > position[node] for u in x.users) if _fresh(x) else True
        if twin is not None and not later:
            node.target = twin


def to_canonical(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the ATen calls of ``gm`` in place into the canonical vocabulary and return it."""
    graph = gm.graph
    _out_of_place(graph)
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target is aten._native_batch_norm_legit_no_training.default:
            _eval_batch_norm(graph, node)
            continue
        call = translate(node)
        if call is None:
            continue
        if call == "drop":
            graph.erase_node(node)
            continue
        if call == "input":
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        # in place: the node keeps its name, its meta and its users
        node.op, node.target = call[0], call[1]
        node.args, node.kwargs = tuple(call[2]), call[3]
    graph.lint()
    gm.recompile()
    return gm
