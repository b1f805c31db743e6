"""nn.MultiheadAttention in the functional vocabulary, and its LibraGrad form.

The canonical op calls the module itself, so the forward is the module's on every path (its
fused fast path included), unless it is handed other tensors than the module's parameters, which
it then honours; the rewritten op reproduces PyTorch's reference path op for op with q and k
detached, which is the path the module takes whenever autograd records the call.
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
    *separate_proj_weights: Tensor,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """nn.MultiheadAttention in functional form, its parameters explicit for the dataflow.

    With the module's own parameters this is the module's call (its fast path included). With
    other tensors in their place (a completeness check substitutes fresh leaves for the biases)
    it runs the module's reference path on the tensors it was given, so they are honoured.
    ``separate_proj_weights`` are q/k/v_proj_weight, passed only when kdim or vdim differ.
    """
    params = (in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
              *separate_proj_weights)
    if _own_parameters(module, params):
        return module(query, key, value, **kwargs)
    return _module_reference_path(module, query, key, value, params, **kwargs)


def libra_multihead_attention(
    module: torch.nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, *params,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """multihead_attention with the attention probabilities constant for the backward.

    When autograd records this call the module takes PyTorch's reference path, which
    ``_attention_reference_path`` reproduces op for op, with q and k detached. Otherwise there
    is no backward to change and ``multihead_attention`` runs (the module's fast path included).
    """
    tensors = (query, key, value, *params)  # params: as for multihead_attention
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return multihead_attention(module, query, key, value, *params, **kwargs)
    return _attention_reference_path(
        *tensors, num_heads=module.num_heads, batch_first=module.batch_first, **kwargs)


def libra_multi_head_attention_forward(
    query: Tensor, key: Tensor, value: Tensor, embed_dim_to_check: int, num_heads: int,
    in_proj_weight: Tensor | None, in_proj_bias: Tensor | None, bias_k: Tensor | None,
    bias_v: Tensor | None, add_zero_attn: bool, dropout_p: float, out_proj_weight: Tensor,
    out_proj_bias: Tensor | None, training: bool = True, key_padding_mask: Tensor | None = None,
    need_weights: bool = True, attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False, q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None, v_proj_weight: Tensor | None = None,
    static_k: Tensor | None = None, static_v: Tensor | None = None,
    average_attn_weights: bool = True, is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """F.multi_head_attention_forward with the attention probabilities constant for the
    backward (attention pooling calls it functionally, with no module behind it).

    When autograd records the call it runs ``_attention_reference_path``, the functional's own
    eval path op for op (the same bits) with q and k detached; otherwise the functional itself.
    The rule swaps in this op only for the calls ``supports_libra_functional`` accepts.
    """
    tensors = (query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
               q_proj_weight, k_proj_weight, v_proj_weight)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return F.multi_head_attention_forward(
            query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
            bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias,
            training=training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=use_separate_proj_weight,
            q_proj_weight=q_proj_weight, k_proj_weight=k_proj_weight,
            v_proj_weight=v_proj_weight, static_k=static_k, static_v=static_v,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
    return _attention_reference_path(
        query, key, value, None if use_separate_proj_weight else in_proj_weight, in_proj_bias,
        out_proj_weight, out_proj_bias, q_proj_weight, k_proj_weight, v_proj_weight,
        num_heads=num_heads, attn_mask=attn_mask, need_weights=need_weights,
        average_attn_weights=average_attn_weights, is_causal=is_causal)


# F.multi_head_attention_forward's arguments that the Libra form reproduces only when they
# are absent (position, name): no bias_k/v, padding mask or static keys.
_ABSENT = ((7, "bias_k"), (8, "bias_v"), (14, "key_padding_mask"), (21, "static_k"),
           (22, "static_v"))


def supports_libra_functional(args: tuple, kwargs: dict) -> bool:
    """The F.multi_head_attention_forward calls that ``libra_multi_head_attention_forward``
    reproduces bit for bit: no bias_k/v, add_zero_attn, key padding mask, static k/v, and
    no dropout (dropout_p 0 or training False)."""
    def value(index: int, name: str, default=None):
        return args[index] if index < len(args) else kwargs.get(name, default)
    dropout = value(10, "dropout_p", 0.0) and value(13, "training", True)
    return (not dropout and value(9, "add_zero_attn", False) is False
            and all(value(i, name) is None for i, name in _ABSENT))


def supports_libra_attention(module: torch.nn.MultiheadAttention, kwargs: dict) -> bool:
    """The configurations that ``libra_multihead_attention`` reproduces bit for bit.

    Self- and cross-attention (query != key = value, or all three different), packed or
    separate projection weights; not bias_k/bias_v, add_zero_attn or a key padding mask.
    """
    return (
        module.bias_k is None
        and module.bias_v is None
        and not module.add_zero_attn
        and kwargs.get("key_padding_mask") is None
    )


def _own_parameters(module: torch.nn.MultiheadAttention, params: tuple) -> bool:
    """True when ``params`` are the module's own tensors (not substitutes)."""
    own = (module.in_proj_weight, module.in_proj_bias, module.out_proj.weight,
           module.out_proj.bias)
    if not module._qkv_same_embed_dim:
        own += (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    return len(params) == len(own) and all(p is o for p, o in zip(params, own, strict=True))


def _batch_second(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batch-first inputs transposed as nn.MultiheadAttention does, keeping ``is`` relations
    (the in-projection takes its self- and cross-attention branches by identity)."""
    if key is value:
        if query is key:
            query = key = value = query.transpose(1, 0)
        else:
            query, key = (t.transpose(1, 0) for t in (query, key))
            value = key
    else:
        query, key, value = (t.transpose(1, 0) for t in (query, key, value))
    return query, key, value


def _module_reference_path(
    module: torch.nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    params: tuple,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """nn.MultiheadAttention.forward's reference (non-fast) path, on the given parameters."""
    in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, *separate = params
    is_batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
        target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
        target_type=query.dtype, check_other=False,
    )
    if module.batch_first and is_batched:
        query, key, value = _batch_second(query, key, value)
    q_weight, k_weight, v_weight = separate or (None, None, None)
    out, weights = F.multi_head_attention_forward(
        query, key, value, module.embed_dim, module.num_heads, in_proj_weight, in_proj_bias,
        module.bias_k, module.bias_v, module.add_zero_attn, module.dropout, out_proj_weight,
        out_proj_bias, training=module.training, key_padding_mask=key_padding_mask,
        need_weights=need_weights, attn_mask=attn_mask,
        use_separate_proj_weight=bool(separate), q_proj_weight=q_weight,
        k_proj_weight=k_weight, v_proj_weight=v_weight,
        average_attn_weights=average_attn_weights, is_causal=is_causal,
    )
    if module.batch_first and is_batched:
        out = out.transpose(1, 0)
    return out, weights


def _attention_reference_path(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor | None,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    *,
    num_heads: int,
    batch_first: bool = False,
    attn_mask: Tensor | None = None,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    key_padding_mask: None = None,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch's eval reference path of nn.MultiheadAttention (no bias_k/v, no padding mask),
    same ops in the same order, with q and k constant for the backward.

    Self- or cross-attention; packed projection weights, or separate ones (q/k/v_proj_weight,
    in_proj_weight None).
    """
    is_batched = query.dim() == 3
    if batch_first and is_batched:
        query, key, value = _batch_second(query, key, value)
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
    if in_proj_weight is None:
        b_q, b_k, b_v = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = F._in_projection(query, key, value, q_proj_weight, k_proj_weight,
                                   v_proj_weight, b_q, b_k, b_v)
    else:
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
