"""The elementwise rule phi(0) + x*[(phi(x)-phi(0))/x]cst and written-out gates, three ways.

Each covered op sits in Linear -> op -> Linear (float64, eval, every parameter jittered):
(a) the rewritten forward is bit-identical (``torch.equal``);
(b) the gradients of the input and of every parameter equal a reference written here:
    ``phi0 + h * cst(slope(h))`` with slope = (phi(h) - phi0)/h, or the derivative at h where
    |h| < sqrt(eps), phi0 = phi(0) computed here, never by libragrad_fx;
(c) completeness, |f - sum x df/dx - sum_b b df/db| / |f|, with phi(0) counted as a bias where
    it is not 0 (the buffer the rule adds, made a leaf here), < 1e-6 on the rewritten graph,
    and > 1e-3 on the model.
Written-out GELUs (GPT-2's gelu_new, HF's NewGELU/FastGELU/gelu_python) are one gate rewrite.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import FastGELUActivation, GELUActivation, NewGELUActivation

from libragrad_fx import LibraWarning, libra, libra_transform
from libragrad_fx.compiler.completeness import completeness_error
from libragrad_fx.runtime.elementwise import secant_form
from tests.harness import completeness_gap, gradients, jitter, readout

D_IN, D, D_OUT, BATCH = 5, 8, 3, 3
SCALE = 5.0  # pre-activations of about N(0, 5.6^2): past relu6's 6 and hardtanh's clips too

pytestmark = pytest.mark.usefixtures("seeded")


def _softplus2(h):
    return F.softplus(h, beta=2.0)


def _celu(h):
    return F.celu(h, 0.7)


def _hardtanh(h):
    return F.hardtanh(h, -0.5, 2.0)


def _elu(h):
    return F.elu(h, 0.5)


def _relu6_as_hardtanh(h):
    return F.hardtanh(h, 0.0, 6.0)


# (id, the op as the model writes it, phi for the reference, phi(0) is a bias, report's name)
OPS = [
    ("torch.tanh", lambda: torch.tanh, torch.tanh, False, "tanh"),
    ("nn.Tanh", nn.Tanh, torch.tanh, False, "tanh"),
    ("x.tanh()", lambda: lambda h: h.tanh(), torch.tanh, False, "tanh"),
    ("torch.sigmoid", lambda: torch.sigmoid, torch.sigmoid, True, "sigmoid"),
    ("nn.Sigmoid", nn.Sigmoid, torch.sigmoid, True, "sigmoid"),
    ("F.hardswish", lambda: F.hardswish, F.hardswish, False, "hardswish"),
    ("nn.Hardswish", nn.Hardswish, F.hardswish, False, "hardswish"),
    ("F.hardsigmoid", lambda: F.hardsigmoid, F.hardsigmoid, True, "hardsigmoid"),
    ("nn.Hardsigmoid", nn.Hardsigmoid, F.hardsigmoid, True, "hardsigmoid"),
    ("F.softplus", lambda: F.softplus, F.softplus, True, "softplus"),
    ("nn.Softplus-beta2", lambda: nn.Softplus(beta=2.0), _softplus2, True, "softplus"),
    ("F.mish", lambda: F.mish, F.mish, False, "mish"),
    ("nn.Mish", nn.Mish, F.mish, False, "mish"),
    ("F.elu", lambda: F.elu, F.elu, False, "elu"),
    ("nn.ELU-0.5", lambda: nn.ELU(0.5), _elu, False, "elu"),
    ("F.selu", lambda: F.selu, F.selu, False, "selu"),
    ("nn.SELU", nn.SELU, F.selu, False, "selu"),
    ("F.celu-0.7", lambda: _celu, _celu, False, "celu"),
    ("F.relu6", lambda: F.relu6, F.relu6, False, "relu6"),
    ("nn.ReLU6", nn.ReLU6, _relu6_as_hardtanh, False, "hardtanh"),
    ("F.hardtanh", lambda: _hardtanh, _hardtanh, False, "hardtanh"),
    ("torch.erf", lambda: torch.erf, torch.erf, False, "erf"),
]


def slope(phi, h: torch.Tensor, phi0: float) -> torch.Tensor:
    """The secant slope (phi(h) - phi0)/h, the derivative at h where |h| < sqrt(eps)."""
    h = h.detach()
    tiny = h.abs() < torch.finfo(h.dtype).eps ** 0.5
    leaf = h.clone().requires_grad_(True)
    (tangent,) = torch.autograd.grad(phi(leaf).sum(), leaf)
    secant = (phi(h) - phi0) / torch.where(tiny, torch.ones_like(h), h)
    return torch.where(tiny, tangent, secant)


class Activated(nn.Module):
    """Linear -> op -> Linear; ``reference`` is phi0 + h * cst(slope(h))."""

    def __init__(self, act, phi=None):
        super().__init__()
        self.inp, self.out = nn.Linear(D_IN, D), nn.Linear(D, D_OUT)
        self.act, self.phi = act, phi

    def forward(self, x):
        return self.out(self.act(self.inp(x)))

    def reference(self, x):
        h = self.inp(x)
        phi0 = self.phi(torch.zeros((), dtype=h.dtype)).item()
        return self.out(phi0 + h * slope(self.phi, h, phi0).detach())


def build(act, phi=None) -> Activated:
    return jitter(Activated(act, phi).double()).eval()


def random_input(batch: int = BATCH) -> torch.Tensor:
    return SCALE * torch.randn(batch, D_IN, dtype=torch.float64)


def biases(model: nn.Module) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if name.endswith("bias")]


def phi0_buffers(gm) -> list[torch.Tensor]:
    """The phi(0) buffers the report names as bias sites at the Libra ops."""
    names = {s.source for s in gm.libra_report.bias_sites if s.op.startswith(
        "libragrad_fx.runtime.elementwise")}
    return [gm.get_buffer(n) for (n,) in names]


def gap(fn, x: torch.Tensor, leaves: list[torch.Tensor]) -> float:
    x = x.detach().clone().requires_grad_(True)
    return completeness_gap(readout(fn(x)), x, leaves)


@pytest.mark.parametrize(("make", "phi", "biased", "name"),
                         [pytest.param(*o[1:], id=o[0]) for o in OPS])
def test_elementwise_op_three_ways(make, phi, biased, name):
    model = build(make(), phi)
    gm = libra_transform(model, strict=True)
    report = gm.libra_report
    assert report.counts["elementwise"] == 1 and sum(report.counts.values()) == 1
    (rewrite,) = report.rewrites
    assert rewrite.rule == "elementwise"
    assert f"phi(0) + x*[(phi(x)-phi(0))/x]cst ({name})" in rewrite.action

    x = random_input()
    assert torch.equal(model(x), gm(x)), "the forward must be bit-identical"

    params = list(model.parameters())
    got, want = gradients(gm, x, params), gradients(model.reference, x, params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(got[0], gradients(model, x, params)[0])

    buffers = phi0_buffers(gm)
    assert len(buffers) == biased, "phi(0) is a bias site exactly where it is not zero"
    if biased:
        assert buffers[0].item() == phi(torch.zeros((), dtype=torch.float64)).item()
    sample = x[:1]
    try:
        for b in buffers:
            b.requires_grad_(True)
        assert gap(gm, sample, biases(model) + buffers) < 1e-6
    finally:
        for b in buffers:
            b.requires_grad_(False)
    assert gap(model, sample, biases(model)) > 1e-3
    # the library's own measure counts the same sites
    assert completeness_error(gm, x, 0).relative.max() < 1e-6
    assert completeness_error(model, x, 0).relative.max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("phi", [torch.tanh, torch.sigmoid, F.softplus, _elu, F.relu6])
def test_no_nan_or_inf_at_zero_and_underflow(phi, dtype):
    """Exact zeros, +-1e-30 and +-1e-7 at the op's input: the Libra op's slope is finite, the
    derivative at x there, the secant elsewhere, and phi0 + x * slope is still phi(x)."""
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 0.5, 2.0, -3.0, 8.0], dtype=dtype)
    phi0 = phi(torch.zeros((), dtype=dtype))
    op = secant_form(phi)
    leaf = x.clone().requires_grad_(True)
    y = op(leaf, phi0 if phi0 != 0 else None)
    assert torch.equal(y, phi(x))
    (got,) = torch.autograd.grad(y.sum(), leaf)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, slope(phi, x, phi0.item()), rtol=0, atol=0)
    tangent_leaf = x.clone().requires_grad_(True)
    (tangent,) = torch.autograd.grad(phi(tangent_leaf).sum(), tangent_leaf)
    torch.testing.assert_close(got[:6], tangent[:6])  # the derivative where |x| is tiny
    torch.testing.assert_close(phi0 + x * got, phi(x), rtol=0, atol=4 * torch.finfo(dtype).eps)


def test_zeros_at_the_op_input_in_a_graph_give_finite_gradients():
    model = build(torch.sigmoid)
    with torch.no_grad():
        model.inp.weight.zero_()
        model.inp.bias.copy_(torch.tensor([0.0, 1e-30, -1e-30, 0.0, 1e-7, -1e-7, 2.0, -3.0]))
    gm = libra_transform(model, strict=True)
    x = random_input()
    got = gradients(gm, x, list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in got)
    assert completeness_error(gm, x, 0).relative.max() < 1e-6


class SoftCap(nn.Module):
    """Gemma2's logit soft-capping: c * tanh(x / c)."""

    def __init__(self, cap: float = 2.0):
        super().__init__()
        self.inp, self.out, self.cap = nn.Linear(D_IN, D), nn.Linear(D, D_OUT), cap

    def forward(self, x):
        return self.cap * torch.tanh(self.out(self.inp(x)) / self.cap)

    def reference(self, x):
        z = self.out(self.inp(x)) / self.cap
        return self.cap * z * slope(torch.tanh, z, 0.0).detach()


def assert_matches_reference(model: nn.Module, gm) -> None:
    """(a) the same forward, (b) the reference's gradients, (c) complete where the model is
    not, for a model whose only non-linear-layer op is its ``reference``'s hand-written form."""
    x = random_input()
    assert torch.equal(model(x), gm(x))
    params = list(model.parameters())
    for g, w in zip(gradients(gm, x, params), gradients(model.reference, x, params), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert gap(gm, x[:1], biases(model)) < 1e-6
    assert gap(model, x[:1], biases(model)) > 1e-3


def test_soft_capping_is_certified_from_tanh_alone():
    model = jitter(SoftCap().double()).eval()
    gm = libra_transform(model, strict=True)
    assert gm.libra_report.counts["elementwise"] == 1
    assert gm.libra_report.complete
    assert_matches_reference(model, gm)


def test_report_names_the_rule_and_phi0_sites():
    gm = libra_transform(build(torch.sigmoid), strict=True)
    report = gm.libra_report
    assert "elementwise" in report.rules
    text = str(report)
    assert "elementwise" in text and "phi(0) + x*[(phi(x)-phi(0))/x]cst (sigmoid)" in text
    (site,) = [s for s in report.bias_sites if s.op.endswith("libra_sigmoid")]
    assert site.implicit and site.path == (1,)


def test_switched_off_tanh_is_a_violation():
    model = build(torch.tanh)
    with pytest.warns(LibraWarning, match="tanh"):
        gm = libra_transform(model, rules=libra(elementwise=False))
    report = gm.libra_report
    assert "elementwise" not in report.rules
    (violation,) = report.violations
    assert "tanh" in violation.op
    assert completeness_error(gm, random_input(), 0).relative.max() > 1e-3


def test_export_frontend_reads_the_same_ops():
    for act in (_elu, F.selu, _celu, F.relu6, nn.ReLU6(), nn.Softplus(beta=2.0)):
        model = build(act)
        x = random_input()
        gm = libra_transform(model, strict=True, frontend="export", example_inputs=(x[:1],))
        assert gm.libra_report.counts["elementwise"] == 1
        assert torch.equal(model(x), gm(x))
        assert completeness_error(gm, x, 0).relative.max() < 1e-6


def test_float32_sigmoid_phi0_is_held_in_the_model_dtype():
    model = jitter(Activated(torch.sigmoid)).eval()
    gm = libra_transform(model, strict=True)
    (buffer,) = phi0_buffers(gm)
    assert buffer.dtype == torch.float32
    x = SCALE * torch.randn(BATCH, D_IN)
    assert torch.equal(model(x), gm(x))
    assert completeness_error(gm, x, 0).relative.max() < 1e-5


# --- written-out GELUs are gates -----------------------------------------------------------------


class GPT2Gelu(nn.Module):
    """GPT-2's gelu_new, as modeling code writes it."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi)
                                            * (x + 0.044715 * torch.pow(x, 3.0))))


def _tanh_gate(h):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))


def _fast_gate(h):
    return 0.5 * (1.0 + torch.tanh(h * 0.7978845608 * (1.0 + 0.044715 * h * h)))


def _erf_gate(h):
    return 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))


class Gated(Activated):
    def reference(self, x):
        h = self.inp(x)
        return self.out(h * self.phi(h).detach())


@pytest.mark.parametrize(("act", "gate", "op"), [
    pytest.param(GPT2Gelu(), _tanh_gate, "tanh", id="gpt2-gelu_new"),
    pytest.param(NewGELUActivation(), _tanh_gate, "tanh", id="hf-NewGELU"),
    pytest.param(FastGELUActivation(), _fast_gate, "tanh", id="hf-FastGELU"),
    pytest.param(GELUActivation(use_gelu_python=True), _erf_gate, "erf", id="hf-gelu_python"),
])
def test_written_out_gelu_is_one_gate(act, gate, op):
    model = jitter(Gated(act, gate).double()).eval()
    gm = libra_transform(model, strict=True)
    report = gm.libra_report
    assert report.counts == {**dict.fromkeys(report.rules, 0), "gate": 1}
    (rewrite,) = report.rewrites
    assert rewrite.rule == "gate" and op in rewrite.action
    assert_matches_reference(model, gm)


def test_a_product_of_two_functions_of_x_is_not_a_gate():
    """tanh(h) * softplus(h): neither factor is a scaled copy of h, so no gate; each op gets the
    elementwise rule and the product is shared by self-gating."""
    model = build(lambda h: torch.tanh(h) * F.softplus(h))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LibraWarning)
        gm = libra_transform(model)
    counts = gm.libra_report.counts
    assert counts["gate"] == 0 and counts["elementwise"] == 2 and counts["self_gating"] == 1
    x = random_input()
    assert torch.equal(model(x), gm(x))
    assert completeness_error(gm, x, 0).relative.max() < 1e-6
