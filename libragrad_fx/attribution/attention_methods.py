"""Attention methods (DESIGN §4): maps built from the attention probabilities A_l and ∂f/∂A_l.

Each reads a row of an aggregated token-to-token matrix: the class token's, or with
``query="mean"`` the mean over all query tokens (the documented fallback for models without a
class token). Under LibraGrad, A_l still receives its gradient ∂f/∂O·Vᵀ; only the path through
A is cut, so the gradient-weighted methods change with the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from .engine import Needs, Readout
from .methods import block_io, zero
from .tokens import Layout


def row(matrix: Tensor, layout: Layout, query: str, method: str) -> Tensor:
    """The class token's row of (B, T, T), or the mean row with ``query='mean'``."""
    if query == "mean":
        return matrix.mean(1)
    if query != "cls":
        raise InputError(f"query must be 'cls' or 'mean', got {query!r}")
    if layout.cls is None:
        raise InputError(
            f"{method!r} reads the class token's row of the attention, and this model has no "
            "class token (its output does not read a prefix token by index). Pass "
            "query='mean' to average the rows of all query tokens instead")
    return matrix[:, layout.cls]


def _eye(a: Tensor) -> Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand(a.shape[0], -1, -1)


def _weighted(a: Tensor, grad: Tensor) -> Tensor:
    """mean over heads of ReLU(∂f/∂A ⊙ A)."""
    return (grad * a).clamp_min(0).mean(1)


def attention(p: Readout, layout: Layout, n: int, query: str) -> tuple[Tensor, Tensor]:
    return row(p.attention[-1][0].mean(1), layout, query, "attention"), zero(p)


def rollout(p: Readout, layout: Layout, n: int, query: str) -> tuple[Tensor, Tensor]:
    r = None
    for a, _ in p.attention:
        step = 0.5 * _eye(a) + 0.5 * a.mean(1)
        r = step if r is None else step @ r
    return row(r, layout, query, "rollout"), zero(p)


def genatt(p: Readout, layout: Layout, n: int, query: str) -> tuple[Tensor, Tensor]:
    eye = _eye(p.attention[0][0])
    r = eye
    for a, grad in p.attention:
        r = r + _weighted(a, grad) @ r
    return row(r - eye, layout, query, "genatt"), zero(p)


def gradsam(p: Readout, layout: Layout, n: int, query: str) -> tuple[Tensor, Tensor]:
    total = sum(_weighted(a, grad) for a, grad in p.attention) / len(p.attention)
    return row(total, layout, query, "gradsam"), zero(p)


def attcat(p: Readout, layout: Layout, n: int, query: str) -> tuple[Tensor, Tensor]:
    total = sum(row(a.mean(1), layout, query, "attcat") * block_io(p, layer)
                for layer, (a, _) in enumerate(p.attention))
    return total, zero(p)


def tokentm(p: Readout, layout: Layout, n: int, query: str) -> tuple[Tensor, Tensor]:
    """GenAtt's aggregation with each layer's source tokens weighted by how far the block moves
    them, ‖h_{l+1} − h_l‖ / ‖h_l‖ (normalised to mean 1): a TokenTM-style variant."""
    eye = _eye(p.attention[0][0])
    r = eye
    for layer, (a, grad) in enumerate(p.attention):
        before = p.h[layer]
        after = p.h[layer + 1] if layer + 1 < n else p.stream_out
        length = (after - before).norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-12)
        length = length / length.mean(-1, keepdim=True).clamp_min(1e-12)
        r = r + (_weighted(a, grad) * length[:, None, :]) @ r
    return row(r - eye, layout, query, "tokentm"), zero(p)


def attention_needs(n: int) -> Needs:
    return Needs(attention=True)


def attention_and_blocks(n: int) -> Needs:
    return Needs(blocks=tuple(range(n)), attention=True)


def transformation_needs(n: int) -> Needs:
    return Needs(blocks=tuple(range(n)), attention=True, stream_out=True)
