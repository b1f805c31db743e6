"""Linear layers in every spelling, with their bias slots, through both frontends (float64, eval).

GPT-2's Conv1D is ``torch.addmm(bias, x.view(-1, d), weight)``; ``baddbmm``, ``addmv``,
``addbmm``, ``einsum`` with a constant weight and ``F.bilinear`` / ``nn.Bilinear`` with one
input-dependent operand are linear layers too. Each is proved three ways:

(a) the compiled forward is bit-identical (``torch.equal``);
(b) its gradients equal a reference written out here with plain tensor ops;
(c) FullGrad-completeness holds (< 1e-6) with the bias counted where the op adds it:
    ``libragrad_fx.completeness_error`` and the tests' own check with the bias parameters; the
    same check without the bias fails (> 1e-3), so the bias site is what makes it hold.

``beta`` and ``alpha`` scale the bias and the product by numbers the backward holds constant,
so the bias is still a bias (b . df/db carries the beta). A product of two input-dependent
operands (``einsum(x, x)``, ``bilinear(x, x)``) has degree 2: the certificate names it and the
completeness check fails.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from libragrad_fx import LibraWarning, completeness_error, libra_transform
from tests.harness import completeness_gap, gradients, jitter, readout

B, T, D, E = 1, 5, 6, 4
FRONTENDS = ("fx", "export")

pytestmark = pytest.mark.usefixtures("seeded")


class Conv1D(nn.Module):
    """GPT-2's Conv1D, as a function or a method call, with optional beta and alpha."""

    def __init__(self, beta: float = 1, alpha: float = 1, method: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(D, E)), nn.Parameter(torch.randn(E))
        self.beta, self.alpha, self.method = beta, alpha, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (E,)
        flat = x.view(-1, x.size(-1))
        scales = {} if self.beta == self.alpha == 1 else {"beta": self.beta, "alpha": self.alpha}
        if self.method:
            y = self.bias.addmm(flat, self.weight, **scales)
        else:
            y = torch.addmm(self.bias, flat, self.weight, **scales)
        return y.view(size_out)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        y = self.beta * self.bias + self.alpha * (x.reshape(-1, D) @ self.weight)
        return y.reshape(x.shape[0], x.shape[1], E)


class Baddbmm(nn.Module):
    def __init__(self, beta: float = 1, alpha: float = 1) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(D, E)), nn.Parameter(torch.randn(T, E))
        self.beta, self.alpha = beta, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.expand(x.shape[0], D, E)
        return torch.baddbmm(self.bias, x, w, beta=self.beta, alpha=self.alpha)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.beta * self.bias + self.alpha * (x @ self.weight)


class Addmv(nn.Module):
    """A matrix-vector product on the flattened sample (one sample at a time)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, T * D))
        self.bias = nn.Parameter(torch.randn(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmv(self.bias, self.weight, x.reshape(-1))[None]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return (self.bias + (self.weight * x.reshape(1, -1)).sum(1))[None]


class Addbmm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(D, E)), nn.Parameter(torch.randn(T, E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addbmm(self.bias, x, self.weight.expand(x.shape[0], D, E))[None]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return (self.bias + (x @ self.weight).sum(0))[None]


class Einsum(nn.Module):
    """``einsum`` with one constant operand (the weight first or second, or in a list) + bias."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(D, E)), nn.Parameter(torch.randn(E))
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spelling == "weight first":
            y = torch.einsum("de,btd->bte", self.weight, x)
        elif self.spelling == "list":
            y = torch.einsum("btd,de->bte", [x, self.weight])
        else:
            y = torch.einsum("btd,de->bte", x, self.weight)
        return y + self.bias

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return (x[..., None] * self.weight).sum(-2) + self.bias


class Bilinear(nn.Module):
    """x^T W c + b with a constant second operand c: as ``F.bilinear`` or ``nn.Bilinear``."""

    def __init__(self, module: bool) -> None:
        super().__init__()
        self.layer = nn.Bilinear(D, D, E) if module else None
        self.weight, self.bias = nn.Parameter(torch.randn(E, D, D)), nn.Parameter(torch.randn(E))
        self.other = nn.Parameter(torch.randn(T, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        other = self.other.expand_as(x)
        if self.layer is not None:
            return self.layer(x, other)
        return F.bilinear(x, other, self.weight, self.bias)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        w, b = ((self.layer.weight, self.layer.bias) if self.layer is not None
                else (self.weight, self.bias))
        return (x[..., None, :, None] * w * self.other[:, None, None, :]).sum((-2, -1)) + b


CASES = {
    "addmm": lambda: Conv1D(),
    "addmm beta alpha": lambda: Conv1D(beta=0.5, alpha=2.0),
    "addmm method": lambda: Conv1D(beta=1.5, method=True),
    "baddbmm": lambda: Baddbmm(),
    "baddbmm beta alpha": lambda: Baddbmm(beta=-0.5, alpha=3.0),
    "addmv": lambda: Addmv(),
    "addbmm": lambda: Addbmm(),
    "einsum": lambda: Einsum("weight second"),
    "einsum weight first": lambda: Einsum("weight first"),
    "einsum list": lambda: Einsum("list"),
    "F.bilinear": lambda: Bilinear(module=False),
    "nn.Bilinear": lambda: Bilinear(module=True),
}


def build(make) -> nn.Module:
    return jitter(make().double()).eval()


def the_bias(model: nn.Module) -> torch.Tensor:
    return model.layer.bias if getattr(model, "layer", None) is not None else model.bias


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("case", CASES)
def test_linear_spelling(case: str, frontend: str) -> None:
    model = build(CASES[case])
    x = torch.randn(B, T, D, dtype=torch.float64)
    gm = libra_transform(model, strict=True, example_inputs=(x,), frontend=frontend)
    report = gm.libra_report
    assert report.frontend == frontend and report.violations == []
    # the bias enters at the op that adds it, found by the bias pass
    sites = [s for s in report.bias_sites if s.source]
    bias_name = next(n for n, p in model.named_parameters() if p is the_bias(model))
    assert [s.source for s in sites] == [(bias_name,)]

    # (a) forward
    assert torch.equal(gm(x), model(x))
    # (b) gradients: the reference written out with plain tensor ops
    params = list(model.parameters())
    assert torch.allclose(model.reference(x), model(x), atol=1e-12)
    for got, want in zip(gradients(gm, x, params), gradients(model.reference, x, params),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # (c) completeness, the bias counted; without it, it fails
    assert completeness_error(gm, x, readout).relative.max().item() < 1e-6
    xi = x.clone().requires_grad_(True)
    assert completeness_gap(readout(gm(xi)), xi, [the_bias(model)]) < 1e-6
    xi = x.clone().requires_grad_(True)
    assert completeness_gap(readout(gm(xi)), xi, []) > 1e-3


class TwoInputProduct(nn.Module):
    """Both operands depend on the input: a product of degree 2, not a linear layer."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.weight, self.bias = nn.Parameter(torch.randn(E, D, D)), nn.Parameter(torch.randn(E))
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "einsum":
            return torch.einsum("btd,bsd->bts", x, self.proj(x))
        return F.bilinear(x, self.proj(x), self.weight, self.bias)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("op", ["einsum", "bilinear"])
def test_two_input_dependent_operands_stay_a_product(op: str, frontend: str) -> None:
    model = build(lambda: TwoInputProduct(op))
    x = torch.randn(B, T, D, dtype=torch.float64)
    with pytest.warns(LibraWarning, match="not certified"):
        gm = libra_transform(model, example_inputs=(x,), frontend=frontend)
    name = "einsum" if op == "einsum" else "bilinear"
    assert [name in v.op for v in gm.libra_report.violations] == [True]
    assert torch.equal(gm(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LibraWarning)
        assert completeness_error(gm, x, readout).relative.max().item() > 1e-3


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_transformers_conv1d(frontend: str) -> None:
    """transformers' own Conv1D (GPT-2's projections): its bias is found and counted."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    model = jitter(conv1d(E, D).double()).eval()
    x = torch.randn(B, T, D, dtype=torch.float64)
    gm = libra_transform(model, strict=True, example_inputs=(x,), frontend=frontend)
    assert [s.source for s in gm.libra_report.bias_sites] == [("bias",)]
    assert torch.equal(gm(x), model(x))
    params = [model.weight, model.bias]
    for got, want in zip(gradients(gm, x, params),
                         gradients(lambda v: v @ model.weight + model.bias, x, params),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert completeness_error(gm, x, readout).relative.max().item() < 1e-6


class Embeds(nn.Module):
    """The test's own wrapper: GPT-2 on ``inputs_embeds``, with an explicit 4-D causal mask
    (the mask builder's vmap is another item of issue 14, not this test's subject)."""

    def __init__(self, model: nn.Module, tokens: int) -> None:
        super().__init__()
        self.model = model
        mask = torch.full((tokens, tokens), float("-inf")).triu(1)[None, None]
        self.register_buffer("mask", mask)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(e.dtype)
        return self.model(inputs_embeds=e, attention_mask=mask).last_hidden_state


def test_gpt2_addmm_is_a_linear_layer() -> None:
    """GPT2Model (activation "gelu") by export: every Conv1D's addmm is a linear layer with a
    bias site, and the whole model certifies."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50,
                                      n_positions=16, activation_function="gelu",
                                      use_cache=False)
    model = Embeds(transformers.GPT2Model(config), tokens=4).double().eval()
    jitter(model, 0.02)
    x = torch.randn(1, 4, 32, dtype=torch.float64)
    gm = libra_transform(model, strict=True, example_inputs=(x,), frontend="export")
    report = gm.libra_report
    addmm = [s for s in report.bias_sites if "addmm" in s.op]
    assert len(addmm) == 4 * config.n_layer  # c_attn, c_proj, c_fc, mlp.c_proj
    assert torch.equal(gm(x), model(x))
    assert completeness_error(gm, x, readout).relative.max().item() < 1e-10
    assert completeness_error(model, x, readout).relative.max().item() > 1e-3
