"""nn.MultiheadAttention in the functional vocabulary, and its LibraGrad form.

The canonical op calls the module itself, so the forward is the module's on every path (its
fused fast path included); the rewritten op reproduces PyTorch's reference path op for op with
q and k detached, which is the path the module takes whenever autograd records the call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


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
