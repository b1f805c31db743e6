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


def wanted(ctx, index: int, tensor: Tensor | None) -> bool:
    """Whether the running backward reads the gradient of input ``index`` of a custom Function.

    ``ctx.needs_input_grad`` says only that the input requires grad, so a backward asked for
    input gradients alone (``torch.autograd.grad(f, x)``) would still compute the gradients
    of every parameter, which native kernels skip. For a leaf (a parameter) the engine knows
    whether its accumulator will run; if it cannot say, the gradient is computed.
    """
    if tensor is None or not ctx.needs_input_grad[index]:
        return False
    if tensor.grad_fn is not None:
        return True
    with torch.enable_grad():
        accumulator = tensor.view_as(tensor).grad_fn.next_functions[0][0]
    try:
        return bool(torch._C._will_engine_execute_node(accumulator))
    except (AttributeError, RuntimeError):
        return True


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
        if ctx.approximate == "tanh":
            return grad * gelu_gate(x, "tanh"), None
        # Phi(x) = erfc(-x/sqrt 2) / 2, in place: one new tensor and four passes where the
        # textbook formula makes five of each, so the gate's backward costs about GELU's own.
        gate = x.mul(-1.0 / math.sqrt(2.0)).erfc_()
        return gate.mul_(grad).mul_(0.5), None


class _GatedSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return F.silu(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return torch.sigmoid(x).mul_(grad)


def libra_gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """F.gelu forward; backward x -> [Phi(x)]cst, so d/dx = Phi(x)."""
    return _GatedGelu.apply(x, approximate)


def libra_silu(x: Tensor) -> Tensor:
    """F.silu forward; backward x -> [sigmoid(x)]cst."""
    return _GatedSilu.apply(x)


class _GatedGlu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.dim = dim
        return F.glu(x, dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        _, b = x.chunk(2, ctx.dim)
        # a * [sigmoid(b)]cst: the gate half gets no gradient.
        return torch.cat([grad * torch.sigmoid(b), torch.zeros_like(b)], ctx.dim), None


def libra_glu(x: Tensor, dim: int = -1) -> Tensor:
    """F.glu forward (a * sigmoid(b), a and b the halves of x); backward a -> [sigmoid(b)]cst.

    The sigmoid is not homogeneous, so unlike SwiGLU's SiLU branch it cannot share the
    gradient: it is a gate, a constant for the backward, and a keeps the whole gradient.
    """
    return _GatedGlu.apply(x, dim)


# --- norm rule -------------------------------------------------------------------------------


class _ConstStatLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        # native_layer_norm is what F.layer_norm runs, and it also returns the statistics the
        # backward needs, so they are not computed twice.
        y, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.ndim = len(normalized_shape)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        shape = x.shape[x.dim() - ctx.ndim:]
        # The native backward is rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = grad * w.
        # Given x_hat = 0 (input and mean zero), it is exactly the constant-sigma backward
        # rstd * (g - mean(g)), in the same fused kernel: the mean-centring stays
        # differentiable, only 1/sigma is a constant.
        dx = torch.ops.aten.native_layer_norm_backward(
            grad, torch.zeros_like(x), shape, torch.zeros_like(mean), rstd, weight, None,
            [True, False, False])[0]
        dw = db = None
        want_w, want_b = wanted(ctx, 2, weight), wanted(ctx, 3, bias)
        if want_w or want_b:  # these see the true x_hat
            _, dw, db = torch.ops.aten.native_layer_norm_backward(
                grad, x, shape, mean, rstd, weight, bias, [False, want_w, want_b])
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
        dw = None
        if wanted(ctx, 2, weight):
            dw = (grad * x * rrms).sum(lead)
        return g * rrms, None, dw, None


class _ConstStatGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):
        ctx.save_for_backward(x, weight)
        ctx.groups, ctx.eps, ctx.has_bias = num_groups, eps, bias is not None
        return F.group_norm(x, num_groups, weight, bias, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        n, channels = x.shape[:2]
        per_channel = (1, channels) + (1,) * (x.dim() - 2)
        lead = [0, *range(2, x.dim())]  # every dim but the channels
        grouped = x.reshape(n, ctx.groups, -1)
        centred = grouped - grouped.mean(-1, keepdim=True)
        rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + ctx.eps)
        g = grad if weight is None else grad * weight.reshape(per_channel)
        g = g.reshape(n, ctx.groups, -1)
        # As in layer norm: the mean-centring (per group) differentiable, 1/sigma a constant.
        dx = ((g - g.mean(-1, keepdim=True)) * rstd).reshape(x.shape)
        dw = None
        if wanted(ctx, 2, weight):
            dw = (grad * (centred * rstd).reshape(x.shape)).sum(lead)
        db = grad.sum(lead) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, None, dw, db, None


def libra_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm forward; backward (x - mu) / sqrt([var]cst + eps) * w + b."""
    return _ConstStatLayerNorm.apply(x, tuple(normalized_shape), weight, bias, eps)


def libra_rms_norm(x, normalized_shape, weight=None, eps=None):
    """F.rms_norm forward; backward x * [rsqrt(mean x^2 + eps)]cst * w."""
    return _ConstStatRmsNorm.apply(x, tuple(normalized_shape), weight, eps)


def libra_group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """F.group_norm forward; backward (x - mu_g) / sqrt([var_g]cst + eps) * w + b per group."""
    return _ConstStatGroupNorm.apply(x, num_groups, weight, bias, eps)


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


# --- a PyTorch workaround --------------------------------------------------------------------


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()  # not a view: models apply in-place activations after batch norm

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def contiguous_grad(x: Tensor) -> Tensor:
    """``x`` itself, with its incoming gradient made contiguous (see canonical.py: eval batch
    norm's CPU backward is wrong for some strided gradients at batch size one)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _ContiguousGrad.apply(x)
    return x
