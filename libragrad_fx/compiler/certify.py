"""The completeness certificate: propagate each tensor's Euler degree k through the graph.

k(v) is defined by J~v . z = k . v, where z is the input and every bias (DESIGN.md §2). The input
has k = 1, a bias k = 1, weights, detached tensors and numbers k = 0. Linear maps keep k,
products add degrees, powers scale them, and any other op is allowed only on k = 0 inputs. The
graph is certified complete when the output has k = 1 and no op broke the calculus; every op
that did is a ``Violation``, named at the node that made the degree go wrong.

Which clause of the calculus an op follows is its op-table record's ``degree`` (optable.py);
this file gives each clause its meaning. Which arguments are added (the bias sites, degree 1)
comes from the bias pass.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch.fx as fx

from . import optable
from .bias import additive_slots, argument_at, bias_sources
from .dataflow import Dataflow, gradient_inputs
from .graph_utils import arg, module_path, target_name
from .opspec import (
    Attention,
    Clause,
    DegreeRule,
    ModuleAttention,
    Own,
    Power,
    Preserving,
    Product,
    Quotient,
    Slot,
    Sum,
)

Degree = Fraction


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
        if not isinstance(value, fx.Node) or optable.makes_zeros(value):
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
        # made upstream (an x*x meeting a residual), so the op that made it is to blame; a
        # product of degree-1 operands (bilinear(x, x) + b) is this op's own doing.
        odd = [value for d, _, value in terms if d != 1 and value is not None]
        if base is not _NO_PRODUCT and base != 1:
            odd += [v for v in node.all_input_nodes if k.flow.depends_on_input(v) and k(v) != 1]
        inputs_only = all(k.flow.depends_on_input(v) for v in odd)
        blamed = next((k.blame(v) for v in odd if k.blame(v) is not None), None)
        raise _Broken(f"adds terms of different degree: {listing}",
                      blamed if inputs_only else None)
    return degrees[0] if degrees else Degree(0)


def _factors(node: fx.Node, k: _Degrees, slots: tuple[Slot, ...]) -> Any:
    degrees = [k(arg(node, i, name, None)) for i, name in slots]
    return None if None in degrees else sum(degrees, Degree(0))


def _product(node: fx.Node, k: _Degrees, rule: Product) -> Any:
    """The degree of the product, plus the op's additive arguments where it has any."""
    if rule.factors:
        degree = _factors(node, k, rule.factors)
    else:
        operands = node.args[rule.first_operand:]
        if rule.first_operand and isinstance(node.args[rule.first_operand], (list, tuple)):
            operands = node.args[rule.first_operand]
        degrees = [k(a) for a in operands]
        degree = None if None in degrees else sum(degrees, Degree(0))
    op = optable.call_record(node)
    return _sum(node, k, degree) if op is not None and op.adds is not None else degree


def _quotient(node: fx.Node, k: _Degrees) -> Any:
    a, b = k(node.args[0]), k(node.args[1])
    return None if None in (a, b) else a - b


def _power(node: fx.Node, k: _Degrees, rule: Power) -> Any:
    base = k(node.args[0])
    p = rule.exponent if rule.exponent is not None else arg(node, 1, "exponent", None)
    if isinstance(p, fx.Node) and k(p) not in (None, 0):
        raise _Broken("a power with an input-dependent exponent")
    if not isinstance(p, numbers.Number):
        raise _Broken("a power with a tensor exponent")
    return None if base is None else base * Fraction(p).limit_denominator(1 << 20)


def _check_attention(node: fx.Node, k: _Degrees, qk: tuple[Slot, ...], masks: tuple[Slot, ...]):
    """Attention is linear in v only while the query, key and masks carry no gradient."""
    if any(k(arg(node, i, name)) not in (None, 0) for i, name in qk):
        raise _Broken("attention with input-dependent query or key: the softmax "
                      "probabilities carry gradient (no attention rule applied)")
    if any(k(arg(node, i, name, None)) not in (None, 0) for i, name in masks):
        raise _Broken("attention whose mask carries gradient into the softmax")


def _attention(node: fx.Node, k: _Degrees, rule: Attention) -> Any:
    _check_attention(node, k, rule.qk, rule.masks)
    return k(arg(node, *rule.value))


_KEYWORD_ONLY = 1 << 30  # a position no call reaches: the argument is passed by keyword
_MHA_MASKS = ((_KEYWORD_ONLY, "attn_mask"), (_KEYWORD_ONLY, "key_padding_mask"))
_MHA_PRODUCT = ((3, "value"), (4, "in_proj_weight"), (6, "out_proj_weight"))


def _module_attention(node: fx.Node, k: _Degrees, rule: ModuleAttention) -> Any:
    # The Libra form detaches q and k itself; both forms leave the masks as they are.
    qk = () if rule.detaches_qk else rule.qk or ((1, "query"), (2, "key"))
    _check_attention(node, k, qk, rule.masks or _MHA_MASKS)
    value = _sum(node, k, _factors(node, k, rule.product or _MHA_PRODUCT))
    return None if value is None else (value, Degree(0))


def _batch_norm(node: fx.Node, k: _Degrees) -> Any:
    if arg(node, 5, "training", False):
        raise _Broken("batch norm in training mode normalises by batch statistics")
    return _sum(node, k, _factors(node, k, ((0, "input"), (3, "weight"))))


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


def _max_min(node: fx.Node, k: _Degrees) -> Any:
    return _sum(node, k) if additive_slots(node) else _preserving(node, k)


_CLAUSES = {
    Clause.BATCH_NORM: _batch_norm, Clause.VAR_MEAN: _var_mean,
    Clause.MASKED_FILL: _masked_fill, Clause.SHARED_PRODUCT: _shared_product, Clause.PAD: _pad,
    Clause.CLAMP: _clamp, Clause.MAX_MIN: _max_min, Clause.REDUCE_ONLY: _reduce_only,
}


def _apply(rule: DegreeRule, node: fx.Node, k: _Degrees) -> Any:
    """The degree that clause ``rule`` of the calculus gives ``node``."""
    if isinstance(rule, Preserving):
        return _preserving(node, k)
    if isinstance(rule, Product):
        return _product(node, k, rule)
    if isinstance(rule, Sum):
        return _sum(node, k)
    if isinstance(rule, Quotient):
        return _quotient(node, k)
    if isinstance(rule, Power):
        return _power(node, k, rule)
    if isinstance(rule, Attention):
        return _attention(node, k, rule)
    if isinstance(rule, ModuleAttention):
        return _module_attention(node, k, rule)
    if isinstance(rule, Own):
        return _CLAUSES[rule.clause](node, k)
    raise TypeError(f"no clause of the calculus for {rule!r}")


def _degree(node: fx.Node, k: _Degrees) -> Any:
    """The degree of ``node``'s value; raises _Broken where the calculus does not hold."""
    if node.op == "placeholder":
        return Degree(1)
    op = optable.of_node(node)
    if op is not None and op.degree is not None:
        return _apply(op.degree, node, k)
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
            k.k[node] = _degree(node, k)
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
