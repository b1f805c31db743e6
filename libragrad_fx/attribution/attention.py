"""Attention probabilities A and their gradient, recomputed from a block's attention inputs.

A is materialised here, outside the graph and only for the methods that read it, so a fused
kernel stays fused and the forward stays bit for bit the graph's. Its gradient is
∂f/∂A = ∂f/∂O · Vᵀ (O = A·V) under either backward: LibraGrad cuts the path through A, not the
gradient A receives.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from ..compiler.opspec import AttentionRead
from ..runtime.sdpa import attention_probabilities
from .structure import AttentionSite, sdpa_arguments


def reads(site: AttentionSite) -> tuple[fx.Node, ...]:
    """The nodes whose values the site needs (besides the gradient at ``site.output``)."""
    nodes = (*site.node.all_input_nodes, site.output)
    return nodes if site.probs is None else (*nodes, site.probs)


def _value(arg_, values: dict):
    return fx.node.map_arg(arg_, lambda n: values[n])


def probabilities(site: AttentionSite, values: dict, grad: Tensor) -> tuple[Tensor, Tensor]:
    """(A, ∂f/∂A), each (B, heads, T, T), from the site's values and ∂f/∂O."""
    with torch.no_grad():
        if site.kind is AttentionRead.FUSED:
            return _sdpa(site, values, grad)
        if site.kind is AttentionRead.SOFTMAX:
            v = values[site.node.args[1]]
            return values[site.probs].detach(), grad @ v.detach().transpose(-2, -1)
        return _mha(site, values, grad)


def _sdpa(site: AttentionSite, values: dict, grad: Tensor) -> tuple[Tensor, Tensor]:
    call = _value(sdpa_arguments(site.node), values)
    q, k, v = call["query"], call["key"], call["value"]
    if k.shape[-3:-2] != q.shape[-3:-2] and k.dim() >= 3 and call.get("enable_gqa"):
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, -3), v.repeat_interleave(repeat, -3)
    probs = attention_probabilities(q, k, call["attn_mask"], bool(call["is_causal"]),
                                    call["scale"])
    return probs, grad @ v.transpose(-2, -1)


def _mha(site: AttentionSite, values: dict, grad: Tensor) -> tuple[Tensor, Tensor]:
    node = site.node
    module = values[node.args[0]]
    query, key, value = (values[a] for a in node.args[1:4])
    w_in, b_in, w_out = (_value(a, values) for a in node.args[4:7])
    if not module.batch_first:
        query, key, value, grad = (t.transpose(0, 1) for t in (query, key, value, grad))
    heads, embed = module.num_heads, query.shape[-1]
    if w_in is not None:
        weights = w_in.split(embed)
    else:
        weights = _value(node.args[8:11], values)
    biases = b_in.split(embed) if b_in is not None else (None, None, None)
    q, k, v = (F.linear(t, w, b) for t, w, b in zip((query, key, value), weights, biases,
                                                         strict=True))

    def split(t: Tensor) -> Tensor:
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    mask = _value(node.kwargs.get("attn_mask"), values)
    if mask is not None and mask.dim() == 3:
        mask = mask.unflatten(0, (q.shape[0], heads))
    causal = bool(node.kwargs.get("is_causal", False)) and mask is None
    probs = attention_probabilities(q, k, mask, causal, None)
    grad_heads = split(grad @ w_out)
    return probs, grad_heads @ v.transpose(-2, -1)

