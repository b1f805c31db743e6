"""Helpers the tests share, in plain PyTorch: they never call libragrad_fx, so what they
compute is the tests' own reference (the completeness check here is not
``libragrad_fx.completeness_error``).

- ``Sandwich``: Linear -> the block under test -> Linear, and the same with the block's
  hand-written ``reference`` form;
- ``perturb``: seeded small noise on every parameter of a real (timm, open_clip) model;
- ``jitter``: larger noise from torch's global RNG on a toy module's parameters;
- ``readout`` and ``gradients``: a fixed random linear readout making f a scalar, and
  d f / d (x, *params);
- ``completeness_terms`` and ``completeness_gap``: f, sum x df/dx and sum_b b df/db, and the
  relative error |f - sum x df/dx - sum_b b df/db| / |f|.

tests/conftest.py holds the fixtures (``seeded``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval mode, and every parameter + 0.02·N(0, 1) from a generator seeded with ``seed``, so that
    no output is exactly zero (timm zero-initialises heads)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def jitter(model: nn.Module, scale: float = 0.5) -> nn.Module:
    """Every parameter + scale·N(0, 1) from torch's global RNG (so the test's seed decides), in
    place: no zero biases or unit norm scales are left."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def readout(out) -> Tensor:
    """A fixed random linear readout of the model output, so that f is a scalar."""
    out = out[0] if isinstance(out, tuple) else out
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return (out * weights).sum()


def gradients(fn: Callable, x: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """d readout(fn(x)) / d (x, *params); zeros where a tensor gets no gradient."""
    x = x.detach().clone().requires_grad_(True)
    grads = torch.autograd.grad(readout(fn(x)), [x, *params], allow_unused=True)
    return [torch.zeros_like(t) if g is None else g
            for t, g in zip([x, *params], grads, strict=True)]


def completeness_terms(f: Tensor, x: Tensor, leaves: Sequence[Tensor],
                       values: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(f, sum x df/dx, sum_b b df/db) for a scalar ``f`` of ``x`` (a leaf that requires grad).

    The bias term differentiates f with respect to ``leaves`` and multiplies each gradient by
    the matching entry of ``values`` (the leaves themselves unless given: a bias whose value is
    not the leaf it is read through, e.g. eval BatchNorm's beta - mu*gamma/sqrt(var+eps)
    through beta); leaves that get no gradient add nothing.
    """
    gx, *grads = torch.autograd.grad(f, [x, *leaves], allow_unused=True)
    bias = torch.zeros((), dtype=x.dtype)
    for b, g in zip(leaves if values is None else values, grads, strict=True):
        if g is not None:
            bias = bias + (b * g).sum()
    return f, (x * gx).sum(), bias


def completeness_gap(f: Tensor, x: Tensor, leaves: Sequence[Tensor],
                     values: Sequence[Tensor] | None = None) -> float:
    """|f - sum x df/dx - sum_b b df/db| / |f|, the terms as in ``completeness_terms``."""
    f, inputs, bias = completeness_terms(f, x, leaves, values)
    return ((f - (inputs + bias)).abs() / f.abs()).item()


class Sandwich(nn.Module):
    """Linear -> block under test -> Linear; ``reference`` uses the block's hand-written form."""

    def __init__(self, block: nn.Module, d_in: int, d: int, d_out: int):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.block = block
        self.out = nn.Linear(d, d_out)

    def forward(self, x):
        return self.out(self.block(self.inp(x)))

    def reference(self, x):
        return self.out(self.block.reference(self.inp(x)))
