"""The runtime operators: forward equal to the op they replace, backward equal to a reference
written out here with explicit detaches (parameters included, which model tests don't reach)."""

import torch
import torch.nn.functional as F

from libragrad_fx.runtime import mha, ops


def _grads(fn, *tensors):
    out = fn(*tensors)
    cot = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    return out, torch.autograd.grad((out * cot).sum(), tensors)


def _leaves(*shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


def test_layer_norm_backward_treats_the_variance_as_constant_for_all_arguments():
    x, w, b = _leaves((3, 4, 8), (8,), (8,))

    def reference(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True).detach()
        return (x - mu) / torch.sqrt(var + 1e-5) * w + b

    out, got = _grads(lambda *t: ops.libra_layer_norm(t[0], (8,), t[1], t[2], 1e-5), x, w, b)
    _, want = _grads(reference, x, w, b)
    assert torch.equal(out, F.layer_norm(x, (8,), w, b, 1e-5))
    for g, r in zip(got, want, strict=True):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


def test_layer_norm_over_two_trailing_dims_without_affine():
    (x,) = _leaves((2, 3, 4, 5))

    def reference(x):
        mu = x.mean((-2, -1), keepdim=True)
        var = (x - mu).pow(2).mean((-2, -1), keepdim=True).detach()
        return (x - mu) / torch.sqrt(var + 1e-6)

    _, (got,) = _grads(lambda t: ops.libra_layer_norm(t, (4, 5), None, None, 1e-6), x)
    _, (want,) = _grads(reference, x)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_rms_norm_backward_treats_the_root_mean_square_as_constant():
    x, w = _leaves((4, 6), (6,))

    def reference(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6).detach() * w

    out, got = _grads(lambda *t: ops.libra_rms_norm(t[0], (6,), t[1], 1e-6), x, w)
    _, want = _grads(reference, x, w)
    assert torch.equal(out, F.rms_norm(x, (6,), w, 1e-6))
    for g, r in zip(got, want, strict=True):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


def test_shared_product_splits_the_gradient_and_reduces_broadcast_factors():
    a, b, c = _leaves((3, 4), (4,), (3, 1))
    out, got = _grads(ops.shared_product, a, b, c)
    prod = a * b * c

    def reference(a, b, c):
        p = a * b * c
        return p.detach() + (p - p.detach()) / 3

    _, want = _grads(reference, a, b, c)
    assert torch.equal(out, prod)
    for g, r, f in zip(got, want, (a, b, c), strict=True):
        assert g.shape == f.shape
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


def test_gates_use_phi_and_sigmoid_directly():
    (x,) = _leaves((50,))
    with torch.no_grad():
        x[0] = 0.0  # x = 0: the gate is Phi(0) = 1/2, not a 0/0
    for approximate in ("none", "tanh"):
        out, (g,) = _grads(lambda t, a=approximate: ops.libra_gelu(t, a), x)
        gate = (0.5 * (1 + torch.erf(x / 2**0.5)) if approximate == "none" else
                0.5 * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3))))
        cot = torch.linspace(-1.0, 2.0, 50, dtype=x.dtype)
        assert torch.equal(out, F.gelu(x, approximate=approximate))
        assert torch.allclose(g, cot * gate.detach(), rtol=1e-12)
    out, (g,) = _grads(ops.libra_silu, x)
    assert torch.equal(out, F.silu(x))
    assert torch.allclose(g, torch.linspace(-1.0, 2.0, 50, dtype=x.dtype) * torch.sigmoid(x))


def test_multihead_attention_without_autograd_runs_the_module_itself():
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    params = (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias)
    with torch.no_grad():  # the module may take its fused fast path here
        want = attn(x, x, x, need_weights=False)[0]
        got = mha.libra_multihead_attention(attn, x, x, x, *params, need_weights=False)[0]
    assert torch.equal(got, want)


def test_custom_backwards_compute_parameter_gradients_only_when_the_engine_reads_them():
    seen = []

    class Recorder(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            return x * w

        @staticmethod
        def backward(ctx, grad):
            seen.append((ops.wanted(ctx, 0, None), ops.wanted(ctx, 1, w)))
            return grad * w, grad * x

    x, w = _leaves((4,), (4,))
    torch.autograd.grad(Recorder.apply(x, w).sum(), x)  # input gradient only
    torch.autograd.grad(Recorder.apply(x, w).sum(), (x, w))
    Recorder.apply(x, w).sum().backward()  # accumulates into every parameter
    Recorder.apply(x, w.detach()).sum().backward()
    assert seen == [(False, False), (False, True), (False, True), (False, False)]
    # the layer norm leaves its weight gradient out when only the input's is asked for,
    # and the input gradient is the same either way
    (dx_alone,) = torch.autograd.grad(ops.libra_layer_norm(x, (4,), w).sum(), x)
    dx_both, _ = torch.autograd.grad(ops.libra_layer_norm(x, (4,), w).sum(), (x, w))
    assert torch.equal(dx_alone, dx_both)
