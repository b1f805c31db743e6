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
from .engine import Needs, Pass
from .methods import Method, _io
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


def _attention(p: Pass, layout: Layout, n: int, query: str):
    return row(p.attention[-1][0].mean(1), layout, query, "attention")


def _rollout(p: Pass, layout: Layout, n: int, query: str):
    r = None
    for a, _ in p.attention:
        step = 0.5 * _eye(a) + 0.5 * a.mean(1)
        r = step if r is None else step @ r
    return row(r, layout, query, "rollout")


def _genatt(p: Pass, layout: Layout, n: int, query: str):
    eye = _eye(p.attention[0][0])
    r = eye
    for a, grad in p.attention:
        r = r + _weighted(a, grad) @ r
    return row(r - eye, layout, query, "genatt")


def _gradsam(p: Pass, layout: Layout, n: int, query: str):
    total = sum(_weighted(a, grad) for a, grad in p.attention) / len(p.attention)
    return row(total, layout, query, "gradsam")


def _attcat(p: Pass, layout: Layout, n: int, query: str):
    return sum(row(a.mean(1), layout, query, "attcat") * _io(p, layer)
               for layer, (a, _) in enumerate(p.attention))


def _tokentm(p: Pass, layout: Layout, n: int, query: str):
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
    return row(r - eye, layout, query, "tokentm")


def _wrap(fn):
    def compute(p: Pass, layout: Layout, n: int, query: str = "cls"):
        return fn(p, layout, n, query), p.score.new_zeros(p.score.shape[0])
    return compute


def _all_blocks(n: int) -> Needs:
    return Needs(blocks=tuple(range(n)), attention=True)


ATTENTION_METHODS = {
    m.name: m for m in (
        Method("attention", lambda n: Needs(attention=True), _wrap(_attention),
               "mean-head attention of the last block, class row"),
        Method("rollout", lambda n: Needs(attention=True), _wrap(_rollout),
               "Π_l (½I + ½Ā_l), class row"),
        Method("genatt", lambda n: Needs(attention=True), _wrap(_genatt),
               "R ← R + mean_h ReLU(∇A ⊙ A) R (Chefer et al. 2021b)"),
        Method("gradsam", lambda n: Needs(attention=True), _wrap(_gradsam),
               "mean over layers and heads of ReLU(∇A) ⊙ A"),
        Method("attcat", _all_blocks, _wrap(_attcat),
               "Σ_l Ā_l[cls] ⊙ Σ_c h_l ⊙ g_l"),
        Method("tokentm", lambda n: Needs(blocks=tuple(range(n)), attention=True,
                                         stream_out=True), _wrap(_tokentm),
               "GenAtt weighted by the length of each token's transformation"),
    )
}
