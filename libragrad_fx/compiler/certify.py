"""The completeness certificate: propagate each tensor's Euler degree k through the graph.

k(v) is defined by J~v . z = k . v, where z is the input and every bias (DESIGN.md §2). The input
has k = 1, a bias k = 1, weights, detached tensors and numbers k = 0. Linear maps keep k,
products add degrees, powers scale them, and any other op is allowed only on k = 0 inputs. The
graph is certified complete when the output has k = 1 and no op broke the calculus; every op
that did is a ``Violation``, named at the node that made the degree go wrong.

The tables below are the whole calculus: ``_LINEAR`` ops are degree-preserving in their first
argument, ``_ADDITIVE`` ops sum terms that must share one degree (their constant tensor terms
are the bias sites, see ``bias.py``), and ``_SPECIAL`` ops have their own degree function.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..runtime import mha, ops, sdpa
from .dataflow import Dataflow, gradient_inputs
from .graph_utils import arg, module_path, target_name

Degree = Fraction
Slot = tuple[int, str]  # an argument: its position and its keyword


@dataclass(frozen=True)
class Violation:
    """A node where the Euler degree broke: the op, where it is, and why."""

    node: str
    module: str
    op: str
    why: str


class _Broken(Exception):
    """Raised by a degree rule; ``origin`` names the node to blame when it is not this one."""

    def __init__(self, why: str, origin: fx.Node | None = None) -> None:
        super().__init__(why)
        self.why, self.origin = why, origin


# --- which arguments are added together ------------------------------------------------------

Path = tuple  # a path into node.args / node.kwargs: (index,), (index, j) or (name,)


def argument_at(node: fx.Node, path: Path) -> Any:
    """The argument of ``node`` at ``path``."""
    value: Any = node.kwargs if isinstance(path[0], str) else node.args
    for step in path:
        value = value[step] if not isinstance(value, dict) else value.get(step)
    return value


def _slot(node: fx.Node, index: int, name: str) -> Path | None:
    """The path of argument ``name`` (positional at ``index``), or None when it is absent."""
    if index < len(node.args):
        return (index,) if node.args[index] is not None else None
    return (name,) if node.kwargs.get(name) is not None else None


def _products_then(*bias: tuple[int, str]) -> Callable[[fx.Node], list[Path]]:
    """Additive slots of an op that computes a product and adds the given bias arguments."""
    return lambda node: [p for i, name in bias if (p := _slot(node, i, name)) is not None]


def _elementwise(node: fx.Node) -> list[Path]:
    """torch.max(a, b) with two tensors picks a summand per element; with a dim it reduces."""
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    return [(0,), (1,)] if isinstance(other, fx.Node) else []


_SUM_SLOTS: dict[Any, Callable[[fx.Node], list[Path]]] = {
    operator.add: lambda n: [(0,), (1,)],
    operator.sub: lambda n: [(0,), (1,)],
    torch.cat: lambda n: [(0, j) for j in range(len(n.args[0]))],
    torch.concat: lambda n: [(0, j) for j in range(len(n.args[0]))],
    torch.stack: lambda n: [(0, j) for j in range(len(n.args[0]))],
    torch.where: lambda n: [(1,), (2,)],
    torch.maximum: lambda n: [(0,), (1,)],
    torch.minimum: lambda n: [(0,), (1,)],
    torch.max: lambda n: _elementwise(n),
    torch.min: lambda n: _elementwise(n),
}
# Ops whose own value is a product of their first operands, plus bias arguments added to it.
BIAS_SLOTS: dict[Any, Callable[[fx.Node], list[Path]]] = {
    F.linear: _products_then((2, "bias")),
    sdpa.cut_linear: _products_then((2, "bias")),
    F.conv1d: _products_then((2, "bias")),
    F.conv2d: _products_then((2, "bias")),
    F.conv3d: _products_then((2, "bias")),
    F.batch_norm: _products_then((1, "running_mean"), (4, "bias")),
    F.layer_norm: _products_then((3, "bias")),
    F.group_norm: _products_then((3, "bias")),
    ops.libra_layer_norm: _products_then((3, "bias")),
    ops.libra_group_norm: _products_then((3, "bias")),
    torch.baddbmm: _products_then((0, "input")),
    torch.addmm: _products_then((0, "input")),
    torch.addcmul: _products_then((0, "input")),
    mha.multihead_attention: _products_then((5, "in_proj_bias"), (7, "out_proj_bias")),
    mha.libra_multihead_attention: _products_then((5, "in_proj_bias"), (7, "out_proj_bias")),
}


def additive_slots(node: fx.Node) -> list[Path]:
    """Paths of the arguments that ``node`` adds to its value (its possible bias sites)."""
    if node.op != "call_function":
        return []
    table = _SUM_SLOTS if node.target in _SUM_SLOTS else BIAS_SLOTS
    rule = table.get(node.target)
    return rule(node) if rule is not None else []


# --- the degree rules ------------------------------------------------------------------------

_PRESERVING_FUNCTIONS = {
    operator.neg, operator.pos, operator.getitem, torch.neg, torch.flatten, torch.reshape,
    torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.roll, torch.flip,
    torch.chunk, torch.split, torch.unbind, torch.narrow, torch.select, torch.sum, torch.mean,
    torch.cumsum, torch.clone, torch.gather, torch.index_select, torch.tile, torch.movedim,
    torch.repeat_interleave, torch.diagonal, torch.t, torch.relu, F.relu, F.leaky_relu,
    torch.abs, torch.amax, torch.amin, torch.sort, torch.topk,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.dropout, F.interpolate, F.pixel_shuffle, F.pixel_unshuffle,
    F.unfold, F.fold, torch.std, torch.linalg.vector_norm, torch.norm, torch.linalg.norm,
    ops.libra_gelu, ops.libra_silu, ops.libra_glu, ops.libra_rms_norm, ops.libra_normalize,
    ops.contiguous_grad,
}
_PRESERVING_METHODS = {
    "view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "expand",
    "repeat", "squeeze", "unsqueeze", "to", "type", "type_as", "float", "half", "bfloat16",
    "double", "mean", "sum", "chunk", "split", "unbind", "narrow", "select", "roll", "flip",
    "clone", "view_as", "reshape_as", "expand_as", "index_select", "gather", "cumsum", "relu",
    "t", "neg", "tile", "repeat_interleave", "movedim", "diagonal", "abs", "amax", "amin",
    "std", "norm", "unfold", "sort", "topk",
}
# Built-in modules still called as modules after canonicalisation that keep the degree.
_PRESERVING_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Unflatten, nn.ZeroPad2d,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.Upsample, nn.Dropout, nn.Identity, nn.Unfold,
    nn.Fold,
)
_ZERO_MAKERS = {torch.zeros, torch.zeros_like}


def is_zero_constant(value: fx.Node) -> bool:
    """A tensor of zeros made on the spot: it adds nothing, whatever its degree."""
    return (value.op == "call_function" and value.target in _ZERO_MAKERS) or (
        value.op == "call_method" and value.target == "new_zeros")


def bias_sources(flow: Dataflow, value: Any) -> tuple[str, ...]:
    """The parameters and buffers behind ``value`` when it is a bias (a constant computed from
    them, not from the input, not zeros); empty otherwise."""
    if (not isinstance(value, fx.Node) or flow.reads_input(value) or is_zero_constant(value)):
        return ()
    return flow.constant_sources(value)


class _Degrees:
    """Degrees of the nodes seen so far; constants are 0 and carry no degree of their own."""

    def __init__(self, flow: Dataflow) -> None:
        self.flow = flow
        self.k: dict[fx.Node, Any] = {}  # Degree, a tuple of them, or None (already broken)
        self.origin: dict[fx.Node, fx.Node] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, fx.Node) and self.flow.depends_on_input(value):
            return self.k.get(value)
        if isinstance(value, (list, tuple)):
            return _common([self(v) for v in value])
        return Degree(0)

    def blame(self, value: Any) -> fx.Node | None:
        return self.origin.get(value) if isinstance(value, fx.Node) else None

    def term(self, value: Any) -> tuple[Any, str] | None:
        """The degree of a summand and what it is; None for a term that is zero."""
        if isinstance(value, fx.Node) and self.flow.depends_on_input(value):
            return self.k.get(value), value.name
        if isinstance(value, numbers.Number):
            return None if value == 0 else (Degree(0), f"the number {value}")
        if not isinstance(value, fx.Node) or is_zero_constant(value):
            return None
        if bias_sources(self.flow, value):
            return Degree(1), f"bias {value.name}"
        if self.flow.reads_input(value):
            return Degree(0), f"{value.name} (computed from the input but detached)"
        return Degree(0), f"the constant {value.name} (no parameter or buffer behind it)"


def _common(degrees: list[Any]) -> Any:
    """The degree shared by all of ``degrees`` (None if any is unknown); raise if they differ."""
    if any(d is None for d in degrees):
        return None
    flat = {d for d in degrees if not isinstance(d, tuple)}
    if len(flat) > 1:
        raise _Broken(f"mixes degrees {sorted(flat)}")
    return flat.pop() if flat else Degree(0)


def _preserving(node: fx.Node, k: _Degrees) -> Any:
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    rest = [v for v in gradient_inputs(node) if v is not first]
    if any(k(v) not in (None, 0) for v in rest):
        raise _Broken("linear in its first argument only, but another argument carries gradient")
    degree = k(first)
    if is_getitem(node) and isinstance(degree, tuple):
        return degree[node.args[1]]
    if isinstance(degree, tuple):
        return _common(list(degree))
    return degree


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


_NO_PRODUCT = object()


def _sum(node: fx.Node, k: _Degrees, base: Any = _NO_PRODUCT) -> Any:
    """The degree of a sum of ``base`` (a product's degree) and the additive arguments."""
    terms = [] if base is _NO_PRODUCT else [(base, "the product", None)]
    for path in additive_slots(node):
        value = argument_at(node, path)
        if (term := k.term(value)) is not None:
            terms.append((*term, value))
    degrees = [d for d, _, _ in terms]
    if any(d is None for d in degrees):
        return None
    if len(set(degrees)) > 1:
        listing = ", ".join(f"{what} (k={d})" for d, what, _ in terms)
        # A constant of the wrong degree is added here; an input term of the wrong degree was
        # made upstream (an x*x meeting a residual), so the op that made it is to blame.
        odd = [value for d, _, value in terms if d != 1 and value is not None]
        if base is not _NO_PRODUCT and base != 1:
            odd += [v for v in node.all_input_nodes if k.flow.depends_on_input(v)]
        inputs_only = all(k.flow.depends_on_input(v) for v in odd)
        blamed = next((k.blame(v) for v in odd if k.blame(v) is not None), None)
        raise _Broken(f"adds terms of different degree: {listing}",
                      blamed if inputs_only else None)
    return degrees[0] if degrees else Degree(0)


def _product_of(*values: Any) -> Callable[[fx.Node, _Degrees], Any]:
    def rule(node: fx.Node, k: _Degrees) -> Any:
        degrees = [k(arg(node, i, name, None)) for i, name in values]
        return None if None in degrees else sum(degrees, Degree(0))
    return rule


def _with_bias(product: Callable[[fx.Node, _Degrees], Any]) -> Callable:
    return lambda node, k: _sum(node, k, product(node, k))


def _mul(node: fx.Node, k: _Degrees) -> Any:
    operands = node.args
    if node.target is torch.einsum:
        operands = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
    degrees = [k(a) for a in operands]
    return None if None in degrees else sum(degrees, Degree(0))


def _div(node: fx.Node, k: _Degrees) -> Any:
    a, b = k(node.args[0]), k(node.args[1])
    return None if None in (a, b) else a - b


def _scaled(factor: Any) -> Callable[[fx.Node, _Degrees], Any]:
    def rule(node: fx.Node, k: _Degrees) -> Any:
        base = k(node.args[0])
        p = factor if factor is not None else arg(node, 1, "exponent", None)
        if isinstance(p, fx.Node) and k(p) not in (None, 0):
            raise _Broken("a power with an input-dependent exponent")
        if not isinstance(p, numbers.Number):
            raise _Broken("a power with a tensor exponent")
        return None if base is None else base * Fraction(p).limit_denominator(1 << 20)
    return rule


def _check_attention(node: fx.Node, k: _Degrees, qk: tuple[Slot, ...], masks: tuple[Slot, ...]):
    """Attention is linear in v only while the query, key and masks carry no gradient."""
    if any(k(arg(node, i, name)) not in (None, 0) for i, name in qk):
        raise _Broken("attention with input-dependent query or key: the softmax "
                      "probabilities carry gradient (no attention rule applied)")
    if any(k(arg(node, i, name, None)) not in (None, 0) for i, name in masks):
        raise _Broken("attention whose mask carries gradient into the softmax")


def _sdpa(node: fx.Node, k: _Degrees) -> Any:
    _check_attention(node, k, ((0, "query"), (1, "key")), ((3, "attn_mask"),))
    return k(arg(node, 2, "value"))


_KEYWORD_ONLY = 1 << 30  # a position no call reaches: the argument is passed by keyword
_MHA_MASKS = ((_KEYWORD_ONLY, "attn_mask"), (_KEYWORD_ONLY, "key_padding_mask"))


def _mha(node: fx.Node, k: _Degrees) -> Any:
    # The rewritten form detaches q and k itself; both forms leave the masks as they are.
    qk = ((1, "query"), (2, "key")) if node.target is mha.multihead_attention else ()
    _check_attention(node, k, qk, _MHA_MASKS)
    value = _sum(node, k, _product_of((3, "value"), (4, "in_proj_weight"), (6, "out_proj_weight"))(
        node, k))
    return None if value is None else (value, Degree(0))


def _batch_norm(node: fx.Node, k: _Degrees) -> Any:
    if arg(node, 5, "training", False):
        raise _Broken("batch norm in training mode normalises by batch statistics")
    return _with_bias(_product_of((0, "input"), (3, "weight")))(node, k)


def _var_mean(node: fx.Node, k: _Degrees) -> Any:
    """(variance, mean): degrees (2k, k); each output is read through getitem."""
    base = k(node.args[0])
    return None if base is None else (2 * base, base)


def _masked_fill(node: fx.Node, k: _Degrees) -> Any:
    value = arg(node, 2, "value")
    if isinstance(value, numbers.Number) and value == 0 or k(node.args[0]) == 0:
        return k(node.args[0])
    raise _Broken("fills a gradient-carrying tensor with a nonzero constant")


def _shared_product(node: fx.Node, k: _Degrees) -> Any:
    degrees = [k(a) for a in node.args]
    return None if None in degrees else sum(degrees, Degree(0)) / len(degrees)


def _pad(node: fx.Node, k: _Degrees) -> Any:
    value = arg(node, 3, "value", None)
    if value in (None, 0) or arg(node, 2, "mode", "constant") != "constant":
        return _preserving(node, k)  # zeros, or reflect/replicate/circular: a gather
    if k(node.args[0]) == 0:
        return Degree(0)
    raise _Broken("pads a gradient-carrying tensor with a nonzero constant")


def _reduce_only(node: fx.Node, k: _Degrees) -> Any:
    """x.max() / x.max(dim) keep the degree; x.max(other) is left to the elementwise form."""
    if any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()]):
        raise _Broken("elementwise max/min of a tensor method with another tensor: write "
                      "torch.maximum(a, b)")
    return _preserving(node, k)


def _clamp(node: fx.Node, k: _Degrees) -> Any:
    low, high = arg(node, 1, "min", None), arg(node, 2, "max", None)
    if low == 0 and high is None:
        return k(node.args[0])  # relu
    raise _Broken("clamp is not homogeneous")


_SPECIAL: dict[Any, Callable[[fx.Node, _Degrees], Any]] = {
    operator.mul: _mul, operator.matmul: _mul, torch.bmm: _mul, torch.einsum: _mul,
    operator.truediv: _div,
    torch.sqrt: _scaled(Fraction(1, 2)), torch.rsqrt: _scaled(Fraction(-1, 2)),
    torch.square: _scaled(2), torch.reciprocal: _scaled(-1), torch.var: _scaled(2),
    operator.pow: _scaled(None), torch.pow: _scaled(None),
    torch.clamp: _clamp, torch.clamp_min: _clamp, F.pad: _pad,
    F.linear: _with_bias(_product_of((0, "input"), (1, "weight"))),
    sdpa.cut_linear: _with_bias(_product_of((0, "input"), (1, "weight"))),
    F.conv1d: _with_bias(_product_of((0, "input"), (1, "weight"))),
    F.conv2d: _with_bias(_product_of((0, "input"), (1, "weight"))),
    F.conv3d: _with_bias(_product_of((0, "input"), (1, "weight"))),
    torch.baddbmm: _with_bias(_product_of((1, "batch1"), (2, "batch2"))),
    torch.addmm: _with_bias(_product_of((1, "mat1"), (2, "mat2"))),
    torch.addcmul: _with_bias(_product_of((1, "tensor1"), (2, "tensor2"))),
    ops.libra_layer_norm: _with_bias(_product_of((0, "x"), (2, "weight"))),
    ops.libra_group_norm: _with_bias(_product_of((0, "x"), (2, "weight"))),
    torch.var_mean: _var_mean,
    F.batch_norm: _batch_norm,
    F.scaled_dot_product_attention: _sdpa,
    sdpa.libra_scaled_dot_product_attention: _sdpa,
    mha.multihead_attention: _mha,
    mha.libra_multihead_attention: _mha,
    torch.masked_fill: _masked_fill,
    ops.shared_product: _shared_product,
    ops.swap_backward: lambda node, k: k(node.args[1]),
    **{f: (lambda node, k: _sum(node, k)) for f in _SUM_SLOTS},
    torch.max: lambda node, k: _sum(node, k) if _elementwise(node) else _preserving(node, k),
    torch.min: lambda node, k: _sum(node, k) if _elementwise(node) else _preserving(node, k),
}
_SPECIAL_METHODS: dict[str, Callable[[fx.Node, _Degrees], Any]] = {
    "var": _scaled(2), "pow": _scaled(None), "sqrt": _scaled(Fraction(1, 2)),
    "rsqrt": _scaled(Fraction(-1, 2)), "masked_fill": _masked_fill, "clamp": _clamp,
    "clamp_min": _clamp, "square": _scaled(2), "max": _reduce_only, "min": _reduce_only,
}


def _rule_for(gm: fx.GraphModule, node: fx.Node) -> Callable | None:
    if node.op == "call_function":
        if node.target in _SPECIAL:
            return _SPECIAL[node.target]
        return _preserving if node.target in _PRESERVING_FUNCTIONS else None
    if node.op == "call_method":
        if node.target in _SPECIAL_METHODS:
            return _SPECIAL_METHODS[node.target]
        return _preserving if node.target in _PRESERVING_METHODS else None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return _preserving if isinstance(module, _PRESERVING_MODULES) else None
    return None


def _degree(gm: fx.GraphModule, node: fx.Node, k: _Degrees) -> Any:
    """The degree of ``node``'s value; raises _Broken where the calculus does not hold."""
    if node.op == "placeholder":
        return Degree(1)
    rule = _rule_for(gm, node)
    if rule is not None:
        return rule(node, k)
    inputs = [k(v) for v in node.all_input_nodes if k.flow.depends_on_input(v)]
    if None in inputs:
        return None
    if all(d == 0 for d in inputs):
        return Degree(0)  # any op of constants (for the backward) is a constant
    degree = max((d for d in inputs if not isinstance(d, tuple)), default="?")
    raise _Broken(f"nonlinear or unknown op on a degree-{degree} input, no rule covers it")


def _mutates(node: fx.Node) -> bool:
    """In-place ops change values behind the graph's edges, so they always count."""
    if node.op == "call_function":
        return node.target is operator.setitem or node.kwargs.get("out") is not None
    return node.op == "call_method" and node.target.endswith("_") and not node.target.startswith(
        "__")


def _walk(gm: fx.GraphModule, flow: Dataflow) -> Iterator[tuple[fx.Node, _Broken]]:
    """Propagate degrees through the graph, yielding each break as it is found."""
    k = _Degrees(flow)
    for node in gm.graph.nodes:
        if node.op == "output":
            yield from _check_output(node, k)
            continue
        if not flow.depends_on_input(node):
            continue
        try:
            k.k[node] = _degree(gm, node, k)
        except _Broken as broken:
            # Carry on as if a rule had repaired the node, so later breaks are reported too.
            inputs = [k(v) for v in gradient_inputs(node) if flow.depends_on_input(v)]
            k.k[node] = None if None in inputs else Degree(any(d != 0 for d in inputs))
            k.origin[node] = node
            if flow.needs_rule(node) or _mutates(node):
                yield node, broken
            continue
        inputs = [v for v in node.all_input_nodes if flow.depends_on_input(v)]
        same = next((v for v in inputs if k(v) == k.k[node]), None)
        k.origin[node] = k.origin.get(same, same) if same is not None else node


def _check_output(node: fx.Node, k: _Degrees) -> Iterator[tuple[fx.Node, _Broken]]:
    values: list[fx.Node] = []
    fx.node.map_arg(node.args[0], values.append)
    for value in values:
        if isinstance(value, fx.Node) and k.flow.depends_on_input(value):
            degree = k(value)
            if isinstance(degree, tuple):  # (output, attention weights): weights carry no grad
                degree = degree[0] if all(d == 0 for d in degree[1:]) else max(degree)
            if degree is not None and degree != 1:
                origin = k.blame(value)
                where = f" (set by {origin.name})" if origin is not None else ""
                yield node, _Broken(f"the output has degree {degree}, not 1{where}", origin)


def certify(gm: fx.GraphModule, flow: Dataflow | None = None) -> list[Violation]:
    """Every place where the graph breaks FullGrad-completeness; empty means certified."""
    flow = Dataflow.of(gm) if flow is None else flow
    found: dict[str, Violation] = {}
    for node, broken in _walk(gm, flow):
        at = broken.origin if broken.origin is not None else node
        op = (type(gm.get_submodule(at.target)).__name__ if at.op == "call_module"
              else target_name(at))
        found.setdefault(at.name, Violation(at.name, module_path(at), op, broken.why))
    return list(found.values())
