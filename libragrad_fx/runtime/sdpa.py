"""Fused attention under the attention rule: the same forward kernels, a backward through V only.

With the probabilities A = softmax(q kᵀ·scale + mask) constant, the only gradient attention
passes back is dV = Aᵀ·dO. PyTorch's fused CPU kernel computes dq, dk and dv in one go
whatever is asked of it, so detaching q and k alone saves nothing there. This op keeps the
fused forward (so the same bits) and recomputes A in the backward for the one product needed.

The projection that makes q, k and v in one matrix (timm's ``qkv``) then receives a gradient
whose q and k rows are zeros; ``cut_linear`` keeps its forward and leaves those rows out of
its backward product, which is a third of the work it does per block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .ops import wanted


def attention_probabilities(query: Tensor, key: Tensor, attn_mask: Tensor | None,
                            is_causal: bool, scale: float | None) -> Tensor:
    """softmax(q kᵀ·scale + mask), as F.scaled_dot_product_attention defines it; a row that
    masks every key gets zeros (the fused kernels' convention) rather than NaN."""
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    logits = (query * scale) @ key.transpose(-2, -1)
    low = logits.dtype in (torch.float16, torch.bfloat16)
    logits = logits.float() if low else logits
    masked = is_causal or attn_mask is not None
    if is_causal:
        length, keys = logits.shape[-2:]
        keep = torch.ones(length, keys, dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, -math.inf)
        else:
            logits = logits + attn_mask
    probs = logits.softmax(-1)
    if masked:
        probs = probs.nan_to_num_(0.0)
    return probs.to(query.dtype) if low else probs


class _ValueOnlyAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, scale, enable_gqa):
        ctx.save_for_backward(query, key, attn_mask)
        ctx.is_causal, ctx.scale, ctx.value_shape = is_causal, scale, value.shape
        return F.scaled_dot_product_attention(query, key, value, attn_mask, 0.0, is_causal,
                                              scale=scale, enable_gqa=enable_gqa)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        query, key, attn_mask = ctx.saved_tensors
        groups = query.shape[-3] // key.shape[-3] if query.dim() >= 3 else 1
        if groups > 1:  # grouped-query attention: each key head serves `groups` query heads
            key = key.repeat_interleave(groups, -3)
        probs = attention_probabilities(query, key, attn_mask, ctx.is_causal, ctx.scale)
        dv = probs.transpose(-2, -1) @ grad
        if groups > 1:
            dv = dv.unflatten(-3, (-1, groups)).sum(-3)
        return None, None, dv.sum_to_size(ctx.value_shape), None, None, None, None


def libra_scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
    enable_gqa: bool = False, mask_carries_gradient: bool = False,
) -> Tensor:
    """F.scaled_dot_product_attention forward; backward [softmax(q kᵀ·scale + mask)]cst · V.

    The rule passes q and k through ``detach`` in the graph as well, so the report and the
    certificate read the cut. Dropout cannot be recomputed and a mask that carries gradient
    changes the kernel's choice (on the CPU: the math kernel, not flash), so those calls run
    the fused op on detached q and k, as before this op existed. ``mask_carries_gradient``:
    the rule detached an input-dependent mask (a logit term computed from q) in the graph;
    while autograd records the call (value requiring grad, as the mask did) the op hands the
    kernel a copy of the mask that requires grad, a leaf of its own, so the kernel is chosen as
    for the model's call and the bits are the same, and no gradient reaches the mask's inputs.
    """
    if (mask_carries_gradient and attn_mask is not None and torch.is_grad_enabled()
            and value.requires_grad):
        attn_mask = attn_mask.detach().requires_grad_()
    if dropout_p or (attn_mask is not None and attn_mask.requires_grad) or not (
            torch.is_grad_enabled() and value.requires_grad):
        return F.scaled_dot_product_attention(query.detach(), key.detach(), value, attn_mask,
                                              dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    return _ValueOnlyAttention.apply(query.detach(), key.detach(), value, attn_mask,
                                     is_causal, scale, enable_gqa)


class _CutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight, bias = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # Output features whose gradient is zero everywhere add exactly nothing to dx.
            live = rows.ne(0).any(0).nonzero().squeeze(1)
            if live.numel() == 0:
                dx = x.new_zeros(x.shape)
            elif int(live[-1] - live[0]) + 1 == live.numel():  # one run: views, no copies
                start, size = int(live[0]), live.numel()
                dx = grad.narrow(-1, start, size) @ weight.narrow(0, start, size)
            else:
                dx = grad.index_select(-1, live) @ weight.index_select(0, live)
        if wanted(ctx, 1, weight):
            dw = rows.t() @ x.reshape(-1, x.shape[-1])
        if wanted(ctx, 2, bias):
            db = rows.sum(0)
        return dx, dw, db


def cut_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:  # noqa: A002
    """F.linear forward; its backward leaves out the output features whose gradient is zero
    (the q and k rows of a fused projection once the attention rule cut them). Exact: those
    rows contribute nothing to the input gradient."""
    if not (torch.is_grad_enabled() and input.requires_grad):
        return F.linear(input, weight, bias)
    return _CutLinear.apply(input, weight, bias)
