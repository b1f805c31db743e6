"""Hand-written LibraGrad forms as forward hooks, for the references the explain tests compare
with: they use plain PyTorch and nothing from libragrad_fx (DESIGN.md §1's table)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

RTOL = 1e-4
# Leaf modules the hooks account for; any other leaf would need its own Libra form.
KNOWN_LEAVES = (nn.Linear, nn.Conv2d, nn.Identity, nn.Dropout, nn.GELU, nn.LayerNorm)


def gelu_hook(module: nn.GELU, args: tuple, output: Tensor) -> Tensor:
    """x · [Φ(x)]cst."""
    assert module.approximate == "none"
    (x,) = args
    return x * (0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))).detach()


def layernorm_hook(module: nn.LayerNorm, args: tuple, output: Tensor) -> Tensor:
    """(x − μ) / √([σ²]cst + ε) · γ + β: the mean-centring stays differentiable."""
    (x,) = args
    assert len(module.normalized_shape) == 1 and module.elementwise_affine
    centred = x - x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True).detach()
    y = centred / torch.sqrt(var + module.eps) * module.weight
    return y + module.bias if module.bias is not None else y


def assert_close_rel(actual: Tensor, expected: Tensor, what: str) -> None:
    """Equal to RTOL relative to the largest entry of ``expected``."""
    assert isinstance(actual, Tensor), what
    shapes = f"{what}: {actual.shape=} {expected.shape=}"
    assert tuple(actual.shape) == tuple(expected.shape), shapes
    actual = actual.detach().to(device=expected.device, dtype=expected.dtype)
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    torch.testing.assert_close(
        actual,
        expected,
        rtol=RTOL,
        atol=RTOL * scale,
        msg=lambda m: f"{what}: max abs err {err:.3e}, max |expected| {scale:.3e}\n{m}",
    )
