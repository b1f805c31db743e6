"""Runtime operators that rewritten graphs call.

Each operator returns exactly what the op it replaces returns (the forward is untouched) and
changes only the backward, following the LibraGrad rules: a statistic or a gate treated as a
constant, or a product's gradient shared between its factors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def cst(t: Tensor) -> Tensor:
    """The value of ``t``, a constant for the backward."""
    return t.detach()


def swap_backward(value: Tensor, grad_source: Tensor) -> Tensor:
    """The value of ``value`` with the gradient of ``grad_source`` (bit for bit the value)."""
    return value.detach() + (grad_source - grad_source.detach())


def _reduce_dims(x: Tensor, ndim_normalized: int) -> tuple[list[int], list[int]]:
    """The normalised (trailing) dims and the leading dims of ``x``."""
    trailing = list(range(x.dim() - ndim_normalized, x.dim()))
    return trailing, list(range(x.dim() - ndim_normalized))


# --- gate rule -------------------------------------------------------------------------------


def gelu_gate(x: Tensor, approximate: str = "none") -> Tensor:
    """Phi(x) (or its tanh approximation): GELU(x) / x, computed without dividing by x."""
    if approximate == "tanh":
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    return 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


class _GatedGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, approximate: str) -> Tensor:
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        return F.gelu(x, approximate=approximate)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return grad * gelu_gate(x, ctx.approximate), None


class _GatedSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return F.silu(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def libra_gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """F.gelu forward; backward x -> [Phi(x)]cst, so d/dx = Phi(x)."""
    return _GatedGelu.apply(x, approximate)


def libra_silu(x: Tensor) -> Tensor:
    """F.silu forward; backward x -> [sigmoid(x)]cst."""
    return _GatedSilu.apply(x)


# --- norm rule -------------------------------------------------------------------------------


class _ConstStatLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        ctx.save_for_backward(x, weight)
        ctx.ndim, ctx.eps, ctx.has_bias = len(normalized_shape), eps, bias is not None
        return F.layer_norm(x, normalized_shape, weight, bias, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dims, lead = _reduce_dims(x, ctx.ndim)
        centred = x - x.mean(dims, keepdim=True)
        rstd = torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + ctx.eps)
        g = grad if weight is None else grad * weight
        # The mean-centring stays differentiable; only 1/sigma is a constant.
        dx = (g - g.mean(dims, keepdim=True)) * rstd
        dw = (grad * centred * rstd).sum(lead) if weight is not None else None
        db = grad.sum(lead) if ctx.has_bias else None
        return dx, None, dw, db, None


class _ConstStatRmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.ndim = len(normalized_shape)
        ctx.eps = torch.finfo(x.dtype).eps if eps is None else eps
        return F.rms_norm(x, normalized_shape, weight, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dims, lead = _reduce_dims(x, ctx.ndim)
        rrms = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + ctx.eps)
        g = grad if weight is None else grad * weight
        dw = (grad * x * rrms).sum(lead) if weight is not None else None
        return g * rrms, None, dw, None


def libra_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm forward; backward (x - mu) / sqrt([var]cst + eps) * w + b."""
    return _ConstStatLayerNorm.apply(x, tuple(normalized_shape), weight, bias, eps)


def libra_rms_norm(x, normalized_shape, weight=None, eps=None):
    """F.rms_norm forward; backward x * [rsqrt(mean x^2 + eps)]cst * w."""
    return _ConstStatRmsNorm.apply(x, tuple(normalized_shape), weight, eps)


def libra_normalize(x, p=2.0, dim=1, eps=1e-12, out=None):
    """F.normalize forward (same ops, same bits); backward x / [||x||]cst."""
    if out is not None:
        raise ValueError("libra_normalize does not support out=")
    denom = x.norm(p, dim, keepdim=True).clamp_min(eps).expand_as(x)
    return x / denom.detach()


# --- self-gating rule ------------------------------------------------------------------------


class _SharedProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *factors):
        ctx.save_for_backward(*factors)
        out = factors[0]
        for f in factors[1:]:
            out = out * f
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        factors = ctx.saved_tensors
        share = grad / len(factors)
        grads = []
        for i, f in enumerate(factors):
            g = share
            for j, other in enumerate(factors):
                if j != i:
                    g = g * other
            grads.append(g.sum_to_size(f.shape) if ctx.needs_input_grad[i] else None)
        return tuple(grads)


def shared_product(*factors: Tensor) -> Tensor:
    """The product of n input-dependent factors; each factor gets 1/n of the gradient."""
    return _SharedProduct.apply(*factors)


# --- attention rule --------------------------------------------------------------------------


def multihead_attention(
    module: torch.nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """nn.MultiheadAttention in functional form: the module's own call, with its parameters
    as explicit arguments so that the dataflow sees them."""
    return module(query, key, value, **kwargs)


def libra_multihead_attention(
    module: torch.nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, *params,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """multihead_attention with the attention probabilities constant for the backward.

    When autograd records this call the module takes PyTorch's reference path, which
    ``_attention_reference_path`` reproduces op for op, with q and k detached. Otherwise there
    is no backward to change and the module runs as it is (its fast path included).
    """
    tensors = (query, key, value, *params)  # params: as for multihead_attention
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return module(query, key, value, **kwargs)
    return _attention_reference_path(
        *tensors, num_heads=module.num_heads, batch_first=module.batch_first, **kwargs)


def supports_libra_attention(module: torch.nn.MultiheadAttention, kwargs: dict) -> bool:
    """The configurations that ``libra_multihead_attention`` reproduces bit for bit."""
    return (
        module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
        and kwargs.get("key_padding_mask") is None
    )


def _attention_reference_path(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor | None,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    *,
    num_heads: int,
    batch_first: bool = False,
    attn_mask: Tensor | None = None,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    key_padding_mask: None = None,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch's eval reference path of nn.MultiheadAttention (packed weights, no bias_k/v, no
    padding mask), same ops in the same order, with q and k constant for the backward."""
    is_batched = query.dim() == 3
    if batch_first and is_batched:
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (t.transpose(1, 0) for t in (query, key))
                value = key
        else:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    tgt_len, bsz, embed_dim = query.shape
    head_dim = embed_dim // num_heads
    if is_causal and not need_weights:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
            target_type=query.dtype, check_other=False,
        )
    q, k, v = F._in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1).detach()
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1).detach()
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    src_len = k.size(1)
    weights = None
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        if attn_mask is not None:
            scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            scores = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(scores, dim=-1)
        out = torch.bmm(weights, v)
        out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            weights = weights.squeeze(0)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    out = out.view(tgt_len, bsz, out.size(1))
    if not is_batched:
        out = out.squeeze(1)
    if batch_first and is_batched:
        out = out.transpose(1, 0)
    return out, weights
