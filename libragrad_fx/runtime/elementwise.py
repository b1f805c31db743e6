"""The elementwise rule's operator: y = phi(x), backward phi(0) + x * [(phi(x) - phi(0)) / x]cst.

One autograd Function serves every elementwise op: it is parameterised by the op's forward
(``secant_form(phi)`` makes the op's Libra form once), so a new op is one op-table record. The
forward is the original kernel's output, bit for bit. The backward holds the secant slope
s(x) = (phi(x) - phi(0)) / x constant, so x * s + phi(0) = phi(x) exactly and the op keeps the
degree of x once phi(0), passed in as ``phi0``, is counted as a bias (it gets the gradient
sum(grad_out)). Where phi(0) = 0 ``phi0`` is None and the op is a plain gate x * [phi(x)/x]cst.

Stability: dividing by x loses every digit as x -> 0 (phi(x) - phi(0) cancels) and is 0/0 at
x == 0. Where |x| < sqrt(eps) of the dtype, the slope is the derivative at x instead, taken
from the op's own backward (autograd on a detached copy; one-sided at a kink, so ELU's slope
on each side of 0 is its own), chosen by ``torch.where`` with a denominator of 1 in the unused
branch, so no NaN or inf reaches the gradient, for x == 0 exactly too. The two agree to
O(|x| phi''), so x * s + phi(0) still equals phi(x) to rounding there.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def secant_slope(phi: Callable, x: Tensor, y: Tensor, phi0: Tensor | None,
                 args: tuple = ()) -> Tensor:
    """(phi(x) - phi0) / x, with the derivative at x where |x| < sqrt(eps); ``y`` is phi(x)."""
    x, y = x.detach(), y.detach()
    tiny = x.abs() < torch.finfo(x.dtype).eps ** 0.5
    with torch.enable_grad():
        leaf = x.clone().requires_grad_(True)
        (tangent,) = torch.autograd.grad(phi(leaf, *args), leaf, torch.ones_like(x))
    rise = y if phi0 is None else y - phi0.to(y.dtype)
    secant = rise / torch.where(tiny, torch.ones_like(x), x)
    return torch.where(tiny, tangent.detach(), secant)


class _Secant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, phi0: Tensor | None, phi: Callable, *args: Any) -> Tensor:
        y = phi(x, *args)  # the original kernel: the forward stays bit-identical
        ctx.save_for_backward(x, y, phi0)
        ctx.phi, ctx.args = phi, args
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Linear in grad (no once_differentiable): the bias maps take a double backward.
        x, y, phi0 = ctx.saved_tensors
        dx = grad * secant_slope(ctx.phi, x, y, phi0, ctx.args) if ctx.needs_input_grad[0] \
            else None
        dphi0 = None
        if phi0 is not None and ctx.needs_input_grad[1]:
            dphi0 = grad.sum_to_size(phi0.shape).to(phi0.dtype)
        return dx, dphi0, None, *(None for _ in ctx.args)


@functools.cache
def secant_form(phi: Callable) -> Callable:
    """The Libra form of the elementwise op ``phi``: ``libra_<name>(x, phi0, *args)``.

    Made once per op and set on this module under its name, so graphs that call it print and
    resolve like any runtime operator.
    """

    def libra(x: Tensor, phi0: Tensor | None = None, *args: Any) -> Tensor:
        return _Secant.apply(x, phi0, phi, *args)

    name = f"libra_{phi.__name__}"
    libra.__name__ = libra.__qualname__ = name
    libra.__module__ = __name__
    libra.__doc__ = (f"{phi.__name__} forward; backward phi(0) + x*[(phi(x)-phi(0))/x]cst, "
                     "phi0 = phi(0) (None where it is 0) counted as a bias.")
    setattr(sys.modules[__name__], name, libra)
    return libra
