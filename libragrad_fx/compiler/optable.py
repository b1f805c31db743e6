"""The op table: one record per op the compiler knows (the fields are described in opspec.py).

The certificate, the bias pass, the rules' replacements, the bias maps, the probes and the
attention methods read these records instead of naming ops themselves, so adding an op is one
record here and its tests (docs/adding-a-rule.md walks through one). Ops that share every fact
(the degree-preserving reshapes, the no-gradient shape queries) are written as one group.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from fractions import Fraction
from types import MappingProxyType
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..runtime import elementwise, mha, ops, sdpa
from .opspec import (
    Arguments,
    Attention,
    AttentionRead,
    BiasMap,
    Bound,
    Clause,
    Listed,
    ModuleAttention,
    Op,
    Operands,
    Own,
    Power,
    Preserving,
    Product,
    Quotient,
    Reads,
    Replacement,
    Sum,
    TwoTensors,
)

_BIAS = Arguments(((2, "bias"),))
_BIAS_3 = Arguments(((3, "bias"),))
_LINEAR = Product(((0, "input"), (1, "weight")))
_NORM_BIAS = Arguments(((3, "bias"),))
_LIBRA_NORM = Product(((0, "x"), (2, "weight")))
_SDPA = Attention(qk=((0, "query"), (1, "key")), value=(2, "value"), masks=((3, "attn_mask"),))
_MHA_BIAS = Arguments(((5, "in_proj_bias"), (7, "out_proj_bias")))
# F.multi_head_attention_forward: q, k; value and the weights it meets (packed or separate);
# the masks; the in- and out-projection biases.
_F_MHA_QK = ((0, "query"), (1, "key"))
_F_MHA_PRODUCT = ((2, "value"), (5, "in_proj_weight"), (11, "out_proj_weight"),
                  (20, "v_proj_weight"))
_F_MHA_MASKS = ((16, "attn_mask"), (14, "key_padding_mask"))
_F_MHA_BIAS = Arguments(((6, "in_proj_bias"), (12, "out_proj_bias")))
_X = Bound(0, "input", required=True)
_NORM_ARGS = (Bound(2, "weight"), Bound(3, "bias"), Bound(4, "eps", 1e-5))


def _gelu_words(x: Any, approximate: str) -> str:
    return f"x*[Phi(x)]cst ({'tanh' if approximate == 'tanh' else 'erf'} GELU)"


# The elementwise rule's Libra ops: the degree of x, plus phi(0) as a bias (a 0-dim buffer the
# rule adds, None where phi(0) = 0) that enters every element alike.
_PHI0 = Arguments(((1, "phi0"),), implicit=((1, "phi0"),))


def _elementwise(target: Callable, args: tuple[Bound, ...] = (_X,), **spellings: Any
                 ) -> tuple[Op, Op]:
    """An elementwise op phi that the elementwise rule makes phi(0) + x*[(phi(x)-phi(0))/x]cst,
    and its Libra form (``runtime/elementwise.py``): one entry in the table."""
    libra = elementwise.secant_form(target)
    words = f"phi(0) + x*[(phi(x)-phi(0))/x]cst ({target.__name__})"
    return (Op(target, libra=Replacement("elementwise", libra, words, args), **spellings),
            Op(libra, Product(((0, "x"),)), _PHI0, forward_of=target,
               bias_map=BiasMap.TRAILING))


_ALPHA = Bound(1, "alpha", 1.0)


_RECORDS: tuple[Op, ...] = (
    # --- layers with a bias ---
    Op(F.linear, _LINEAR, _BIAS, bias_map=BiasMap.TRAILING,
       libra=Replacement("attention", sdpa.cut_linear, "skips q, k rows")),
    Op(sdpa.cut_linear, _LINEAR, _BIAS, forward_of=F.linear, bias_map=BiasMap.TRAILING,
       detached_params=True),
    *(Op(conv, _LINEAR, _BIAS, bias_map=BiasMap.CHANNELS)
      for conv in (F.conv1d, F.conv2d, F.conv3d)),
    # beta * input + alpha * (a @ b) (GPT-2's Conv1D is addmm): beta and alpha are numbers
    # the backward holds constant, so beta * input is a bias all the same (b . df/db carries
    # the beta) and alpha leaves the product's degree as it is.
    *(Op(f, Product(((1, a), (2, b))), Arguments(((0, "input"),)), methods=(f.__name__,))
      for f, a, b in ((torch.addmm, "mat1", "mat2"), (torch.addmv, "mat", "vec"),
                      (torch.baddbmm, "batch1", "batch2"), (torch.addbmm, "batch1", "batch2"))),
    Op(torch.bilinear, Product(((0, "input1"), (1, "input2"), (2, "weight"))), _BIAS_3,
       bias_map=BiasMap.TRAILING),
    Op(torch.addcmul, Product(((1, "tensor1"), (2, "tensor2"))), Arguments(((0, "input"),))),
    # --- normalisation: the norm rule makes the statistic a constant ---
    Op(F.layer_norm, None, _NORM_BIAS, bias_map=BiasMap.TRAILING, libra=Replacement(
        "norm", ops.libra_layer_norm, "x-mu over [sigma]cst (layer_norm)",
        (_X, Bound(1, "normalized_shape", required=True), *_NORM_ARGS))),
    Op(ops.libra_layer_norm, _LIBRA_NORM, _NORM_BIAS, forward_of=F.layer_norm,
       bias_map=BiasMap.TRAILING, detached_params=True),
    Op(F.group_norm, None, _NORM_BIAS, bias_map=BiasMap.CHANNELS, libra=Replacement(
        "norm", ops.libra_group_norm, "x-mu over [sigma]cst per group (group_norm)",
        (_X, Bound(1, "num_groups", required=True), *_NORM_ARGS))),
    Op(ops.libra_group_norm, _LIBRA_NORM, _NORM_BIAS, forward_of=F.group_norm,
       bias_map=BiasMap.CHANNELS, detached_params=True),
    Op(F.rms_norm, libra=Replacement(
        "norm", ops.libra_rms_norm, "x*[rsqrt(mean x^2)]cst (rms_norm)",
        (_X, Bound(1, "normalized_shape", required=True), Bound(2, "weight"),
         Bound(3, "eps")))),
    Op(ops.libra_rms_norm, Preserving(), forward_of=F.rms_norm, detached_params=True),
    Op(F.normalize, libra=Replacement(
        "norm", ops.libra_normalize, "x/[||x||]cst (normalize)",
        (_X, Bound(1, "p", 2.0), Bound(2, "dim", 1), Bound(3, "eps", 1e-12)))),
    Op(ops.libra_normalize, Preserving(), forward_of=F.normalize),
    Op(F.batch_norm, Own(Clause.BATCH_NORM),
       Arguments(((1, "running_mean"), (4, "bias")), implicit=((1, "running_mean"),)),
       bias_map=BiasMap.CHANNELS),
    Op(ops.contiguous_grad, Preserving()),
    Op(torch.var_mean, Own(Clause.VAR_MEAN)),
    # --- gates: the gate rule makes act(x)/x a constant ---
    # (a Libra gate keeps the degree of x: Preserving, given in its Replacement)
    Op(F.gelu, libra=Replacement("gate", ops.libra_gelu, _gelu_words,
                                 (_X, Bound(1, "approximate", "none")), Preserving())),
    Op(F.silu, modules=(nn.SiLU,), libra=Replacement(
        "gate", ops.libra_silu, "x*[sigmoid(x)]cst (SiLU)", (_X,), Preserving())),
    Op(F.glu, libra=Replacement("gate", ops.libra_glu, "a*[sigmoid(b)]cst (GLU)",
                                (_X, Bound(1, "dim", -1)), Preserving())),
    # --- elementwise: phi(0) + x*[(phi(x)-phi(0))/x]cst, phi(0) a bias where it is not 0 ---
    *_elementwise(torch.tanh, methods=("tanh",), aliases=(F.tanh,), modules=(nn.Tanh,)),
    *_elementwise(torch.sigmoid, methods=("sigmoid",), aliases=(F.sigmoid, torch.special.expit),
                  modules=(nn.Sigmoid,)),
    *_elementwise(torch.erf, methods=("erf",), aliases=(torch.special.erf,)),
    *_elementwise(F.hardswish, modules=(nn.Hardswish,)),
    *_elementwise(F.hardsigmoid, modules=(nn.Hardsigmoid,)),
    *_elementwise(F.softplus, (_X, Bound(1, "beta", 1.0), Bound(2, "threshold", 20.0)),
                  modules=(nn.Softplus,), module_args=("beta", "threshold")),
    *_elementwise(F.mish, modules=(nn.Mish,)),
    *_elementwise(F.elu, (_X, _ALPHA), modules=(nn.ELU,), module_args=("alpha",)),
    *_elementwise(F.selu, aliases=(torch.selu,), modules=(nn.SELU,)),
    *_elementwise(F.celu, (_X, _ALPHA), aliases=(torch.celu,), modules=(nn.CELU,),
                  module_args=("alpha",)),
    *_elementwise(F.hardtanh, (_X, Bound(1, "min_val", -1.0), Bound(2, "max_val", 1.0)),
                  modules=(nn.Hardtanh,), module_args=("min_val", "max_val")),
    *_elementwise(F.relu6),
    # --- attention: the attention rule makes the probabilities constants ---
    Op(F.scaled_dot_product_attention, _SDPA, attention=AttentionRead.FUSED,
       libra=Replacement("attention", sdpa.libra_scaled_dot_product_attention,
                         "q, k detached; fused forward, backward dV = A^T dO")),
    Op(sdpa.libra_scaled_dot_product_attention, _SDPA, attention=AttentionRead.FUSED,
       forward_of=F.scaled_dot_product_attention),
    Op(mha.multihead_attention, ModuleAttention(detaches_qk=False), _MHA_BIAS,
       attention=AttentionRead.MODULE,
       libra=Replacement("attention", mha.libra_multihead_attention,
                         "attention probabilities constant (q, k detached)")),
    Op(mha.libra_multihead_attention, ModuleAttention(detaches_qk=True), _MHA_BIAS,
       attention=AttentionRead.MODULE, forward_of=mha.multihead_attention),
    *(Op(target, ModuleAttention(libra, _F_MHA_QK, _F_MHA_PRODUCT, _F_MHA_MASKS), _F_MHA_BIAS,
         forward_of=F.multi_head_attention_forward if libra else None,
         libra=None if libra else Replacement(
             "attention", mha.libra_multi_head_attention_forward,
             "attention probabilities constant (q, k detached; functional MHA)"))
      for target, libra in ((F.multi_head_attention_forward, False),
                            (mha.libra_multi_head_attention_forward, True))),
    Op(torch.softmax, methods=("softmax",), aliases=()),
    # --- self-gating: a product of n input-dependent factors, 1/n of the gradient each ---
    Op(operator.mul, Product(), methods=("mul",), aliases=(torch.mul, torch.multiply),
       libra=Replacement("self_gating", ops.shared_product)),
    Op(ops.shared_product, Own(Clause.SHARED_PRODUCT), forward_of=operator.mul),
    # --- arithmetic ---
    Op(operator.matmul, Product(), methods=("matmul",), aliases=(torch.matmul,)),
    Op(torch.bmm, Product()),
    Op(torch.einsum, Product(first_operand=1)),
    Op(operator.truediv, Quotient(), aliases=(torch.div, torch.true_divide)),
    Op(operator.add, Sum(), Operands(), methods=("add",), aliases=(torch.add,),
       bias_map=BiasMap.TRAILING),
    Op(operator.sub, Sum(), Operands(), methods=("sub",), aliases=(torch.sub,),
       bias_map=BiasMap.SUBTRACTED),
    *(Op(f, Sum(), Listed(), bias_map=BiasMap.PLACED) for f in (torch.cat, torch.concat,
                                                                  torch.stack)),
    Op(torch.where, Sum(), Operands((1, 2))),
    *(Op(f, Sum(), Operands()) for f in (torch.maximum, torch.minimum)),
    *(Op(f, Own(Clause.MAX_MIN), TwoTensors()) for f in (torch.max, torch.min)),
    *(Op(name, Own(Clause.REDUCE_ONLY)) for name in ("max", "min")),
    Op(torch.sqrt, Power(Fraction(1, 2)), methods=("sqrt",)),
    Op(torch.rsqrt, Power(Fraction(-1, 2)), methods=("rsqrt",)),
    Op(torch.square, Power(Fraction(2))),
    Op(torch.reciprocal, Power(Fraction(-1))),
    Op(torch.var, Power(Fraction(2))),
    *(Op(f, Power()) for f in (operator.pow, torch.pow)),
    *(Op(name, Power(p)) for name, p in (("var", Fraction(2)), ("pow", None),
                                           ("sqrt", Fraction(1, 2)), ("rsqrt", Fraction(-1, 2)),
                                           ("square", Fraction(2)))),
    *(Op(f, Own(Clause.CLAMP)) for f in (torch.clamp, torch.clamp_min, "clamp", "clamp_min")),
    *(Op(f, Own(Clause.MASKED_FILL)) for f in (torch.masked_fill, "masked_fill")),
    Op(F.pad, Own(Clause.PAD)),
    # --- nonlinear ops with no rule yet: canonical spellings only ---
    Op(torch.exp, methods=("exp",)),
    Op(torch.log, methods=("log",)),
    Op(torch.relu, Preserving(), methods=("relu",)),
    Op(F.relu, Preserving(), modules=(nn.ReLU,)),
)


def _group(targets: Iterable[Any], **facts: Any) -> tuple[Op, ...]:
    return tuple(Op(t, **facts) for t in targets)


# Linear or positively homogeneous in their first argument: they keep its degree.
_PRESERVING = _group((
    operator.neg, operator.pos, operator.getitem, torch.neg, torch.flatten, torch.reshape,
    torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.roll, torch.flip,
    torch.chunk, torch.split, torch.unbind, torch.narrow, torch.select, torch.sum, torch.mean,
    torch.cumsum, torch.clone, torch.gather, torch.index_select, torch.tile, torch.movedim,
    torch.repeat_interleave, torch.diagonal, torch.t, torch.swapaxes, torch.swapdims,
    F.leaky_relu,
    torch.abs, torch.amax, torch.amin, torch.sort, torch.topk,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.dropout, F.interpolate, F.pixel_shuffle, F.pixel_unshuffle,
    F.unfold, F.fold, torch.std, torch.linalg.vector_norm, torch.norm, torch.linalg.norm,
    # methods
    "view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "expand",
    "repeat", "squeeze", "unsqueeze", "type", "float", "half", "bfloat16",
    "double", "mean", "sum", "chunk", "split", "unbind", "narrow", "select", "roll", "flip",
    "clone", "index_select", "gather", "cumsum", "relu",
    "t", "neg", "tile", "repeat_interleave", "movedim", "diagonal", "abs", "amax", "amin",
    "std", "norm", "unfold", "sort", "topk", "swapaxes", "swapdims",
    # built-in modules still called as modules after canonicalisation
    nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Unflatten, nn.ZeroPad2d,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.Upsample, nn.Dropout, nn.Identity, nn.Unfold,
    nn.Fold,
), degree=Preserving())
# Methods whose other arguments give only a dtype, device or shape.
_SELF_ONLY = _group(("to", "type_as", "expand_as", "view_as", "reshape_as"),
                    degree=Preserving(), reads=Reads.FIRST)
# Calls that read only shapes, dtypes or devices, and the comparisons and index makers.
_SHAPES = _group((getattr, len, torch._assert, torch.zeros_like, torch.ones_like,
                  torch.empty_like, torch.full_like, "size", "dim", "numel", "new_zeros",
                  "new_ones", "new_empty", "new_full", "is_floating_point", "get_device"),
                 gradient=False, reads=Reads.SHAPES)
_NO_GRADIENT = _group((
    torch.detach, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge,
    torch.argmax, torch.argmin, torch.argsort, torch.arange, torch.zeros, torch.ones,
    torch.full, torch.empty,
    "detach", "argmax", "argmin", "argsort", "eq", "ne", "lt", "le", "gt", "ge", "long", "int",
    "bool",
), gradient=False)
_ZEROS = (torch.zeros, torch.zeros_like, "new_zeros")


def _build() -> MappingProxyType:
    table: dict[Any, Op] = {}
    derived = tuple(Op(op.libra.target, op.libra.degree, forward_of=op.target)
                    for op in _RECORDS if op.libra is not None and op.libra.degree is not None)
    for op in (*_RECORDS, *derived, *_PRESERVING, *_SELF_ONLY, *_SHAPES, *_NO_GRADIENT):
        if op.target in table:
            raise AssertionError(f"two records for {op.target!r}")
        table[op.target] = op
    return MappingProxyType(table)


TABLE = _build()


def record(target: Any) -> Op | None:
    """The record of a call_function target, a method name or a module class (its nearest
    recorded base class), or None for an op the compiler does not know."""
    if isinstance(target, type):
        return next((TABLE[c] for c in target.__mro__ if c in TABLE), None)
    try:
        return TABLE.get(target)
    except TypeError:  # an unhashable target
        return None


def of_node(node: fx.Node) -> Op | None:
    """The record of what ``node`` calls (functions, methods and modules alike)."""
    if node.op == "call_function":
        return record(node.target)
    if node.op == "call_method":
        return record(str(node.target))
    if node.op == "call_module":
        gm = node.graph.owning_module
        return record(type(gm.get_submodule(node.target))) if gm is not None else None
    return None


def call_record(node: Any) -> Op | None:
    """The record of a call_function node only (None for anything else)."""
    if isinstance(node, fx.Node) and node.op == "call_function":
        return record(node.target)
    return None


def forms(target: Callable) -> tuple[Callable, ...]:
    """``target`` and every op that computes its forward (its Libra forms)."""
    return (target, *(op.target for op in TABLE.values() if op.forward_of is target))


def makes_zeros(node: fx.Node) -> bool:
    """A tensor of zeros made on the spot: it adds nothing, whatever its degree."""
    return node.op in ("call_function", "call_method") and node.target in _ZEROS


def aliases() -> dict[Callable, Callable]:
    """Functions that are another spelling of a canonical function (same kernel)."""
    return {a: op.target for op in TABLE.values() for a in op.aliases}


def canonical_methods() -> dict[str, Callable]:
    """Tensor methods that become the canonical function of the same meaning (self first)."""
    return {m: op.target for op in TABLE.values() for m in op.methods}


def module_spellings() -> dict[type, Callable]:
    """One-input built-in modules that become the canonical function they run."""
    return {m: op.target for op in TABLE.values() for m in op.modules}


def module_arguments() -> dict[type, tuple[str, ...]]:
    """The attributes of those modules that their function takes after the input, in order."""
    return {m: op.module_args for op in TABLE.values() for m in op.modules if op.module_args}
