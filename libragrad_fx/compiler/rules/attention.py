"""Attention rule: the attention probabilities are constants; gradient flows through V only.

Forms: fused ``scaled_dot_product_attention`` (q and k detached, and the call swapped for its
op-table Libra form: the same fused forward, a backward that computes dV = Aᵀ·dO alone instead
of the fused kernel's dq, dk and dv), an explicit
``softmax(...) @ V`` (scale, mask and dropout in between are looked through),
``nn.MultiheadAttention`` (canonicalised to one call, then swapped for its Libra form), and
probabilities that reach their product with an input-dependent value through linear maps with
constant weights (talking-heads mixing, scaling by constants, sums), detached where the softmax
is read.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...runtime.mha import supports_libra_attention, supports_libra_functional
from .. import optable
from ..dataflow import Dataflow, gradient_inputs
from ..graph_utils import arg, detach_use, is_call
from ..opspec import AttentionRead, ModuleAttention, Replacement
from .base import Rule, Swap, is_passthrough, libra_form, swap, through_passthrough


@dataclass(frozen=True)
class FusedAttention:
    """Fused attention with input-dependent q or k: swapped for its Libra form.
    ``mask_carries_gradient``: an additive logit term computed from the input (decomposed
    relative positions from q) is part of the probabilities, detached with them."""

    replacement: Replacement
    mask_carries_gradient: bool = False


@dataclass(frozen=True)
class SoftmaxUses:
    """Probabilities that reach a product with an input-dependent value through linear maps:
    detached at each of ``uses``."""

    uses: tuple[fx.Node, ...]


@dataclass(frozen=True)
class ProbabilitiesOperand:
    """The plain ``softmax(...) @ V``: the probabilities are operand ``index`` of the matmul."""

    index: int

@dataclass(frozen=True)
class FactorisedQuery:
    """Factorised attention ``q @ (softmax(k)ᵀ @ v)``, and the query's product with
    position-encoded values ``q ⊙ conv(v)``: the query is operand ``index``, part of the
    attention weights, constant like the probabilities."""

    index: int
    words: str

_MATMULS = (operator.matmul, torch.bmm, torch.matmul)
_PRODUCTS = (operator.mul, torch.einsum, *_MATMULS)
# Linear in their first argument when every other operand is a constant for the backward
# (a convolution too: talking-heads mixing written as a 1x1 conv over the heads).
_LINEARS = optable.forms(F.linear)  # F.linear and its Libra forms
_LINEAR_IN_FIRST = (*_LINEARS, F.conv1d, F.conv2d, F.conv3d, operator.truediv, operator.getitem,
                    operator.neg, torch.sum, torch.mean, torch.unbind, torch.chunk,
                    torch.split, torch.select, torch.narrow)
# A fused q/k/v projection's cut form (its backward leaves out the detached q and k rows).
_CUT_PROJECTION = optable.record(F.linear).libra
_SPLITS = (torch.unbind, torch.chunk, torch.split)
_LINEAR_METHODS = {"sum", "mean", "unbind", "chunk", "split", "select", "narrow"}
# Linear in each operand when the others are constants (the product by a constant).
_LINEAR_IN_ANY = (operator.mul, operator.add, operator.sub, torch.einsum, *_MATMULS)


def _linear_in(user: fx.Node, value: fx.Node) -> bool:
    """True when ``user`` is an affine map of ``value``, its other operands being constants."""
    first = bool(user.args) and user.args[0] is value
    if is_passthrough(user):
        return first
    if user.op == "call_method":
        return first and user.target in _LINEAR_METHODS
    return is_call(user, *_LINEAR_IN_ANY) or (first and is_call(user, *_LINEAR_IN_FIRST))


def _plain(product: fx.Node, softmax: fx.Node, flow: Dataflow) -> bool:
    """The ``softmax(...) @ V`` form (through reshapes and dropout only), matched at the matmul."""
    return is_call(product, *_MATMULS) and len(product.args) == 2 and any(
        through_passthrough(a) is softmax and flow.depends_on_input(product.args[1 - i])
        for i, a in enumerate(product.args))


def _renormalises(user: fx.Node, value: fx.Node) -> bool:
    """``value / value.sum(-1)``: a mixture of probabilities renormalised by its own row sum
    (gated positional attention) is still a matrix of probabilities."""
    if not (is_call(user, operator.truediv) and len(user.args) == 2 and user.args[0] is value):
        return False
    total = through_passthrough(user.args[1])
    reduces = is_call(total, torch.sum, torch.mean) or (
        isinstance(total, fx.Node) and total.op == "call_method" and total.target in ("sum",
                                                                                      "mean"))
    return reduces and total.args[0] is value


def _reaches_product(first: fx.Node, softmax: fx.Node, flow: Dataflow) -> bool:
    """Whether a linear path from ``softmax`` through its user ``first`` multiplies an
    input-dependent value (other than by the plain form)."""
    stack, seen = [(first, softmax)], set()
    while stack:
        user, value = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        others = [a for a in gradient_inputs(user) if a is not value]
        dependent = any(flow.depends_on_input(a) for a in others)
        if dependent and is_call(user, *_PRODUCTS) and flow.needs_rule(user):
            if not _plain(user, softmax, flow):
                return True
        elif (not dependent and _linear_in(user, value)) or _renormalises(user, value):
            stack.extend((u, user) for u in user.users)
    return False


def _projection(value) -> fx.Node | None:
    """The ``F.linear`` that produced ``value`` through reshapes and splits alone, if any."""
    while is_passthrough(value) or is_call(value, operator.getitem, *_SPLITS) or (
            isinstance(value, fx.Node) and value.op == "call_method"
            and value.target in ("unbind", "chunk", "split")):
        value = value.args[0]
    return value if is_call(value, *_LINEARS) else None


def _softmax_product(value) -> bool:
    """``softmax(...) @ V`` (through reshapes): probabilities that have met their values."""
    value = through_passthrough(value)
    return is_call(value, *_MATMULS) and len(value.args) == 2 and any(
        is_call(through_passthrough(a), torch.softmax) for a in value.args)


def _query_operand(node: fx.Node, flow: Dataflow) -> int | None:
    """The query's position in ``q @ (softmax(k)ᵀ @ v)``, or None for any other product."""
    if not (is_call(node, *_MATMULS) and len(node.args) == 2):
        return None
    for i, operand in enumerate(node.args):
        other = node.args[1 - i]
        if (_softmax_product(other) and flow.depends_on_input(operand)
                and not is_call(through_passthrough(operand), torch.softmax)):
            return i
    return None


def _is_factorised_query(value, flow: Dataflow) -> bool:
    """Whether ``value`` is (a slice or reshape of) the query of a factorised attention."""
    while isinstance(value, fx.Node):
        value = through_passthrough(value)
        if any(_query_operand(u, flow) is not None and through_passthrough(
                u.args[_query_operand(u, flow)]) is value for u in value.users):
            return True
        if not is_call(value, operator.getitem):
            return False
        value = value.args[0]
    return False


def _match(node: fx.Node, flow: Dataflow):
    if not flow.needs_rule(node):
        return None
    op = optable.call_record(node)
    replacement = libra_form(node, "attention")
    if replacement is not None and op.attention is AttentionRead.FUSED:
        q, k = arg(node, 0, "query"), arg(node, 1, "key")
        mask = arg(node, 3, "attn_mask", None)
        masked = flow.depends_on_input(mask)
        dependent = masked or flow.depends_on_input(q) or flow.depends_on_input(k)
        return FusedAttention(replacement, masked) if dependent else None
    if (replacement is not None and op.attention is None
            and isinstance(op.degree, ModuleAttention)):  # the functional MHA
        return Swap(replacement) if supports_libra_functional(node.args, node.kwargs) else None
    if replacement is not None and op.attention is AttentionRead.MODULE:
        module = node.args[0]
        owner = module.graph.owning_module.get_submodule(module.target)
        return Swap(replacement) if supports_libra_attention(
            owner, node.kwargs) else None
    if (index := _query_operand(node, flow)) is not None:
        return FactorisedQuery(index, "query constant (factorised attention q (softmax(k)^T v))")
    if is_call(node, operator.mul) and len(node.args) == 2 and all(
            flow.depends_on_input(a) for a in node.args):
        for i, operand in enumerate(node.args):
            if _is_factorised_query(operand, flow):
                return FactorisedQuery(i, "query constant in its product with position-encoded "
                                          "values (factorised attention)")
    if is_call(node, torch.softmax):
        uses = tuple(u for u in node.users if _reaches_product(u, node, flow))
        return SoftmaxUses(uses) if uses else None
    if is_call(node, *_MATMULS) and len(node.args) == 2:
        for i, operand in enumerate(node.args):
            other = node.args[1 - i]
            source = through_passthrough(operand)
            if (
                is_call(source, torch.softmax)
                and flow.depends_on_input(source)
                and flow.depends_on_input(other)
            ):
                return ProbabilitiesOperand(i)
    return None


def _replace(graph: fx.Graph, node: fx.Node, payload) -> str:
    if isinstance(payload, FusedAttention):
        q, k = arg(node, 0, "query"), arg(node, 1, "key")
        mask = arg(node, 3, "attn_mask", None)
        cut = [p for p in dict.fromkeys((_projection(q), _projection(k))) if p is not None]
        for value in dict.fromkeys((q, k)):
            if isinstance(value, fx.Node):
                detach_use(graph, node, value)
        words = swap(node, payload.replacement)
        if payload.mask_carries_gradient:
            detach_use(graph, node, mask)
            node.kwargs = {**node.kwargs, "mask_carries_gradient": True}
            words += "; the input-dependent mask (a logit term) constant too"
        if not cut:
            return words
        said = [swap(projection, _CUT_PROJECTION) for projection in cut][0]
        return f"{words}; {', '.join(p.name for p in cut)} {said}"
    if isinstance(payload, Swap):
        return swap(node, payload.replacement)
    if isinstance(payload, FactorisedQuery):
        detach_use(graph, node, node.args[payload.index])
        return payload.words
    if isinstance(payload, SoftmaxUses):
        for use in payload.uses:
            detach_use(graph, use, node)
        return "softmax probabilities constant (linear maps of them multiply V)"
    detach_use(graph, node, node.args[payload.index])
    return "softmax probabilities constant"


RULE = Rule(
    name="attention",
    summary="[softmax(QK^T/sqrt(d) + mask)]cst . V",
    match=_match,
    replace=_replace,
)
