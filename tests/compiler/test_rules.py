"""Every LibraGrad rule form, proved three ways on tiny hand-built modules (float64, eval mode).

(a) the rewritten forward is bit-identical to the model's: ``torch.equal(model(x), gm(x))``;
(b) its input and parameter gradients equal a reference written out in this file with explicit
    ``.detach()`` placements (``p.detach() + (p - p.detach()) / n`` for the 1/n products), which
    never calls libragrad_fx;
(c) FullGrad-completeness, |f - sum x df/dx - sum_b b df/db| / |f| with the biases being the
    parameters that enter additively, holds on the rewritten graph (< 1e-6) and fails on the
    model (> 1e-3). Apart from the op under test each module is made of linear layers with
    biases, so only that op can break completeness.

The report is checked for each form too: rewrite counts per rule and the certificate.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from libragrad_fx import LibraWarning, libra, libra_transform
from tests.harness import Sandwich, completeness_gap, gradients, jitter, readout

D_IN, D, D_OUT, HEADS, TOKENS, BATCH = 6, 8, 3, 2, 5, 2
HEAD_DIM = D // HEADS
EPS = 1e-5
RULES = ("attention", "gate", "elementwise", "norm", "self_gating")


pytestmark = pytest.mark.usefixtures("seeded")  # torch.manual_seed(0) before each test


# --- helpers -----------------------------------------------------------------------------------


def counts(**nonzero: int) -> dict[str, int]:
    """The report counts of the full preset: every rule, zeros included."""
    return {rule: nonzero.get(rule, 0) for rule in RULES}


def causal_mask(n: int = TOKENS) -> torch.Tensor:
    """A float additive causal mask: -inf above the diagonal."""
    return torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)


def biases(model: nn.Module) -> list[torch.Tensor]:
    """The parameters that enter additively: every test module names them ``...bias``."""
    return [p for name, p in model.named_parameters() if name.endswith("bias")]


def completeness_error(fn, x: torch.Tensor, bias_params: list[torch.Tensor]) -> float:
    """|f - sum x df/dx - sum_b b df/db| / |f| for one sample."""
    assert x.shape[0] == 1, "completeness is per sample"
    x = x.detach().clone().requires_grad_(True)
    return completeness_gap(readout(fn(x)), x, bias_params)


def build(block: nn.Module) -> Sandwich:
    return jitter(Sandwich(block, D_IN, D, D_OUT).double()).eval()


def random_input(batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, TOKENS, D_IN, dtype=torch.float64)


def assert_rule_form(model: Sandwich, expected: dict[str, int]):
    """(a), (b), (c) and the report for one rule form; returns the rewritten graph."""
    gm = libra_transform(model, strict=True)
    report = gm.libra_report
    assert report.rules == RULES
    assert report.counts == expected
    assert sorted(r.rule for r in report.rewrites) == sorted(
        rule for rule, n in expected.items() for _ in range(n))
    assert report.violations == []

    x = random_input()
    assert torch.equal(model(x), gm(x)), "the forward must be bit-identical"

    names = ["input", *(name for name, _ in model.named_parameters())]
    params = list(model.parameters())
    got = gradients(gm, x, params)
    want = gradients(model.reference, x, params)
    vanilla = gradients(model, x, params)
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"gradient of {name}")
    assert not torch.allclose(got[0], vanilla[0]), "the rule must change the input gradient"

    sample, bias_params = x[:1], biases(model)
    assert completeness_error(gm, sample, bias_params) < 1e-6
    assert completeness_error(model, sample, bias_params) > 1e-3
    return gm


def shared(p: torch.Tensor, n: int) -> torch.Tensor:
    """The value of p with 1/n of its gradient (the self-gating reference)."""
    return p.detach() + (p - p.detach()) / n


# --- attention ---------------------------------------------------------------------------------


class Attention(nn.Module):
    """Two-head self-attention; ``form`` picks how the probabilities and their product are written.

    ``reference``: softmax(cst(q) cst(k)^T * scale + mask) @ v, i.e. gradient through v only.
    """

    def __init__(self, form: str, mask: str | None = None):
        super().__init__()
        self.form, self.mask_kind = form, mask
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.drop = nn.Dropout(0.1)
        self.softmax = nn.Softmax(dim=-1)
        self.scale = HEAD_DIM**-0.5
        self.register_buffer("mask", causal_mask() if mask else torch.zeros(TOKENS, TOKENS))

    def split(self, h):
        b, t, _ = h.shape
        qkv = self.qkv(h).reshape(b, t, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def merge(self, out):
        b, _, t, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, t, D))

    def forward(self, h):
        q, k, v = self.split(h)
        if self.form == "sdpa":
            if self.mask_kind == "is_causal":
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif self.mask_kind == "float":
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v)
            return self.merge(out)
        scores = q @ k.transpose(-2, -1) * self.scale + self.mask
        if self.form == "method":
            attn = self.drop(scores.softmax(-1))
        elif self.form == "torch.softmax":
            attn = self.drop(torch.softmax(scores, dim=-1))
        elif self.form == "F.softmax":
            attn = self.drop(F.softmax(scores, dim=-1))
        elif self.form == "nn.Softmax":
            attn = self.drop(self.softmax(scores))
        elif self.form == "F.dropout":
            attn = F.dropout(scores.softmax(dim=-1), p=0.1, training=self.training)
        else:
            raise ValueError(self.form)
        if self.form == "torch.softmax":
            return self.merge(torch.matmul(attn, v))
        return self.merge(attn @ v)

    def reference(self, h):
        q, k, v = self.split(h)
        scores = q.detach() @ k.detach().transpose(-2, -1) * self.scale + self.mask
        return self.merge(scores.softmax(-1) @ v)


@pytest.mark.parametrize(
    ("form", "mask"),
    [
        ("sdpa", None),
        ("sdpa", "float"),
        ("sdpa", "is_causal"),
        ("method", "float"),
        ("torch.softmax", "float"),
        ("F.softmax", "float"),
        ("nn.Softmax", "float"),
        ("F.dropout", None),
    ],
)
def test_attention(form, mask):
    gm = assert_rule_form(build(Attention(form, mask)), counts(attention=1))
    (rewrite,) = gm.libra_report.rewrites
    assert rewrite.module == "block"


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention on batch-first tokens, in either layout, optionally masked."""

    def __init__(self, batch_first: bool, need_weights: bool, masked: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=batch_first)
        self.batch_first, self.need_weights = batch_first, need_weights
        self.register_buffer("mask", causal_mask().float() if masked else None)

    def forward(self, h):
        x = h if self.batch_first else h.transpose(0, 1)
        out, _ = self.mha(x, x, x, need_weights=self.need_weights, attn_mask=self.mask)
        return out if self.batch_first else out.transpose(0, 1)

    def reference(self, h):
        m = self.mha
        b, t, _ = h.shape
        (wq, wk, wv), (bq, bk, bv) = m.in_proj_weight.chunk(3), m.in_proj_bias.chunk(3)

        def heads(y):
            return y.reshape(b, t, HEADS, HEAD_DIM).transpose(1, 2)

        q, k, v = heads(F.linear(h, wq, bq)), heads(F.linear(h, wk, bk)), heads(F.linear(h, wv, bv))
        scores = q.detach() @ k.detach().transpose(-2, -1) / math.sqrt(HEAD_DIM)
        if self.mask is not None:
            scores = scores + self.mask
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, D)
        return m.out_proj(out)


MHA_CASES = [
    pytest.param(bf, nw, masked, id=f"batch_first={bf}-need_weights={nw}-masked={masked}")
    for bf in (True, False) for nw in (False, True) for masked in (False, True)
]


@pytest.mark.parametrize(("batch_first", "need_weights", "masked"), MHA_CASES)
def test_multihead_attention(batch_first, need_weights, masked):
    gm = assert_rule_form(
        build(MultiheadAttention(batch_first, need_weights, masked)), counts(attention=1))
    (rewrite,) = gm.libra_report.rewrites
    assert rewrite.module == "block.mha"


class MhaOutputs(nn.Module):
    """nn.MultiheadAttention's own return value: (output, weights or None)."""

    def __init__(self, batch_first: bool, need_weights: bool, masked: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=batch_first, dtype=torch.float64)
        self.need_weights = need_weights
        self.register_buffer("mask", causal_mask() if masked else None)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=self.need_weights, attn_mask=self.mask)


@pytest.mark.parametrize(("batch_first", "need_weights", "masked"), MHA_CASES)
def test_multihead_attention_returns_the_modules_output_and_weights(
    batch_first, need_weights, masked
):
    model = jitter(MhaOutputs(batch_first, need_weights, masked)).eval()
    gm = libra_transform(model, strict=True)
    shape = (BATCH, TOKENS, D) if batch_first else (TOKENS, BATCH, D)
    x = torch.randn(shape, dtype=torch.float64)
    (out, weights), (gm_out, gm_weights) = model.mha(x, x, x, need_weights=need_weights,
                                                     attn_mask=model.mask), gm(x)
    assert torch.equal(out, gm_out)
    if need_weights:
        assert torch.equal(weights, gm_weights)
    else:
        assert weights is None and gm_weights is None


def test_multihead_attention_forward_is_the_modules_under_no_grad():
    """Without autograd nn.MultiheadAttention takes its native fast path: so must the graph."""
    model = jitter(MhaOutputs(batch_first=True, need_weights=False, masked=False)).eval()
    gm = libra_transform(model, strict=True)
    x = torch.randn(BATCH, TOKENS, D, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(x)[0], gm(x)[0])


# --- gate --------------------------------------------------------------------------------------


def phi(h):
    return 0.5 * (1 + torch.erf(h / math.sqrt(2)))


def phi_tanh(h):
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


def quick_gelu(h):
    return h * torch.sigmoid(1.702 * h)


def swish(h):
    return h * torch.sigmoid(h)


def swish_reversed(h):
    return h.sigmoid() * h


def gelu_tanh(h):
    return F.gelu(h, approximate="tanh")


class Gate(nn.Module):
    """An activation x * gate(x); ``reference`` is x * cst(gate(x)) with the gate written out."""

    def __init__(self, act, gate):
        super().__init__()
        self.act, self.gate = act, gate

    def forward(self, h):
        return self.act(h)

    def reference(self, h):
        return h * self.gate(h).detach()


GATES = [
    pytest.param(nn.GELU, phi, "erf GELU", id="nn.GELU"),
    pytest.param(lambda: nn.GELU(approximate="tanh"), phi_tanh, "tanh GELU", id="nn.GELU-tanh"),
    pytest.param(lambda: F.gelu, phi, "erf GELU", id="F.gelu"),
    pytest.param(lambda: gelu_tanh, phi_tanh, "tanh GELU", id="F.gelu-tanh"),
    pytest.param(nn.SiLU, torch.sigmoid, "SiLU", id="nn.SiLU"),
    pytest.param(lambda: F.silu, torch.sigmoid, "SiLU", id="F.silu"),
    pytest.param(lambda: quick_gelu, lambda h: torch.sigmoid(1.702 * h), "written-out",
                 id="QuickGELU"),
    pytest.param(lambda: swish, torch.sigmoid, "written-out", id="x*sigmoid(x)"),
    pytest.param(lambda: swish_reversed, torch.sigmoid, "written-out", id="x.sigmoid()*x"),
]


@pytest.mark.parametrize(("make_act", "gate", "action"), GATES)
def test_gate(make_act, gate, action):
    gm = assert_rule_form(build(Gate(make_act(), gate)), counts(gate=1))
    (rewrite,) = gm.libra_report.rewrites
    assert action in rewrite.action


# --- self-gating -------------------------------------------------------------------------------


class Glu(nn.Module):
    """A product of input-dependent branches; ``reference`` gives each of n factors 1/n."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        if form.startswith("swiglu"):
            self.w1 = nn.Parameter(torch.randn(D, D) / math.sqrt(D))
            self.w2 = nn.Parameter(torch.randn(D, D) / math.sqrt(D))
            self.act = nn.SiLU()
        else:
            self.fc1, self.fc2, self.fc3 = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, h):
        if self.form == "swiglu":
            return F.silu(h @ self.w1) * (h @ self.w2)
        if self.form == "swiglu-nn.SiLU":
            return self.act(h @ self.w1) * (h @ self.w2)
        if self.form == "geglu":
            return F.gelu(self.fc1(h)) * self.fc2(h)
        return (self.fc1(h) * self.fc2(h)) * self.fc3(h)

    def reference(self, h):
        if self.form.startswith("swiglu"):
            a = h @ self.w1
            return shared(a * torch.sigmoid(a).detach() * (h @ self.w2), 2)
        if self.form == "geglu":
            a = self.fc1(h)
            return shared(a * phi(a).detach() * self.fc2(h), 2)
        return shared(self.fc1(h) * self.fc2(h) * self.fc3(h), 3)


@pytest.mark.parametrize(
    ("form", "expected", "share"),
    [
        pytest.param("swiglu", counts(gate=1, self_gating=1), "1/2"),
        ("swiglu-nn.SiLU", counts(gate=1, self_gating=1), "1/2"),
        ("geglu", counts(gate=1, self_gating=1), "1/2"),
        ("three", counts(self_gating=1), "1/3"),
    ],
)
def test_self_gating(form, expected, share):
    gm = assert_rule_form(build(Glu(form)), expected)
    (product,) = [r for r in gm.libra_report.rewrites if r.rule == "self_gating"]
    assert share in product.action
    assert f"product of {share[-1]} input-dependent factors" in product.action


def test_self_gating_switched_off_leaves_completeness_broken():
    model = build(Glu("swiglu-nn.SiLU"))
    with pytest.warns(LibraWarning, match="mul"):
        gm = libra_transform(model, rules=libra(self_gating=False))
    report = gm.libra_report
    assert report.counts == {"attention": 0, "gate": 1, "elementwise": 0, "norm": 0}
    assert [u.op for u in report.violations] == ["operator.mul"]
    x = random_input()
    assert torch.equal(model(x), gm(x))
    assert completeness_error(gm, x[:1], biases(model)) > 1e-3


# --- norm --------------------------------------------------------------------------------------


class Norm(nn.Module):
    """A normalisation in one of its forms; ``reference`` makes its statistic a constant.

    layer: (h - mean) / cst(sqrt(var + eps)) * w + b;  rms: h * cst(rsqrt(mean h^2 + eps)) * w;
    l2: h / cst(||h||).
    """

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        if form in ("F.normalize", "x/x.norm"):
            self.kind = "l2"
        else:
            self.kind = "rms" if "rms" in form.lower() else "layer"
        self.dims = (-2, -1) if form == "nn.LayerNorm-2d" else (-1,)
        self.eps = None if form == "nn.RMSNorm-eps-None" else EPS
        if form in ("nn.LayerNorm", "nn.LayerNorm-no-affine", "nn.LayerNorm-2d"):
            shape = (TOKENS, D) if form.endswith("2d") else D
            self.norm = nn.LayerNorm(shape, eps=EPS, elementwise_affine="no-affine" not in form)
        elif form in ("nn.RMSNorm", "nn.RMSNorm-eps-None"):
            self.norm = nn.RMSNorm(D, eps=self.eps)
        elif form in ("F.layer_norm", "written-LayerNorm", "written-LayerNorm-rsqrt"):
            self.weight, self.bias = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))
        elif form in ("F.rms_norm", "written-RMSNorm", "written-RMSNorm-rsqrt-first"):
            self.weight = nn.Parameter(torch.ones(D))

    def forward(self, h):
        form = self.form
        if form.startswith("nn."):
            return self.norm(h)
        if form == "F.layer_norm":
            return F.layer_norm(h, (D,), self.weight, self.bias, EPS)
        if form == "F.layer_norm-no-affine":
            return F.layer_norm(h, (D,))
        if form == "written-LayerNorm":
            u = h.mean(-1, keepdim=True)
            s = (h - u).pow(2).mean(-1, keepdim=True)
            return (h - u) / torch.sqrt(s + EPS) * self.weight + self.bias
        if form == "written-LayerNorm-rsqrt":
            u = h.mean(-1, keepdim=True)
            s = h.var(-1, keepdim=True, unbiased=False)
            return (h - u) * (s + EPS).rsqrt() * self.weight + self.bias
        if form == "F.rms_norm":
            return F.rms_norm(h, (D,), self.weight, EPS)
        if form == "written-RMSNorm":
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * self.weight
        if form == "written-RMSNorm-rsqrt-first":
            return self.weight * (torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * h)
        if form == "F.normalize":
            return F.normalize(h, dim=-1)
        if form == "x/x.norm":
            return h / h.norm(dim=-1, keepdim=True)
        raise ValueError(form)

    def affine(self):
        owner = getattr(self, "norm", self)
        return getattr(owner, "weight", None), getattr(owner, "bias", None)

    def reference(self, h):
        if self.kind == "l2":
            return h / h.norm(dim=-1, keepdim=True).detach()
        eps = torch.finfo(h.dtype).eps if self.eps is None else self.eps
        if self.kind == "layer":
            centred = h - h.mean(self.dims, keepdim=True)
            var = centred.pow(2).mean(self.dims, keepdim=True)
            y = centred / torch.sqrt(var + eps).detach()
        else:
            y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps).detach()
        weight, bias = self.affine()
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        return y


NORM_FORMS = [
    ("nn.LayerNorm", "layer_norm"),
    ("nn.LayerNorm-no-affine", "layer_norm"),
    ("nn.LayerNorm-2d", "layer_norm"),
    ("F.layer_norm", "layer_norm"),
    ("F.layer_norm-no-affine", "layer_norm"),
    ("written-LayerNorm", "[sqrt]cst"),
    ("written-LayerNorm-rsqrt", "[rsqrt]cst"),
    ("nn.RMSNorm", "rms_norm"),
    ("nn.RMSNorm-eps-None", "rms_norm"),
    ("F.rms_norm", "rms_norm"),
    ("written-RMSNorm", "[rsqrt]cst"),
    ("written-RMSNorm-rsqrt-first", "[rsqrt]cst"),
    ("F.normalize", "normalize"),
    ("x/x.norm", "[norm]cst"),
]


@pytest.mark.parametrize(("form", "action"), NORM_FORMS)
def test_norm(form, action):
    gm = assert_rule_form(build(Norm(form)), counts(norm=1))
    (rewrite,) = gm.libra_report.rewrites
    assert action in rewrite.action


# --- ablation switches -------------------------------------------------------------------------


class TinyBlock(nn.Module):
    """A pre-norm Transformer block with every rule: LayerNorm, SDPA, SwiGLU."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention("sdpa")
        self.mlp = Glu("swiglu-nn.SiLU")

    def forward(self, h):
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


FULL = counts(attention=1, gate=1, norm=2, self_gating=1)


def test_all_rules_together():
    model = build(TinyBlock())
    gm = libra_transform(model, strict=True)
    assert gm.libra_report.counts == FULL
    assert gm.libra_report.violations == []
    x = random_input()
    assert torch.equal(model(x), gm(x))
    assert completeness_error(gm, x[:1], biases(model)) < 1e-6
    assert completeness_error(model, x[:1], biases(model)) > 1e-3


@pytest.mark.parametrize(
    ("switch", "broken_op", "n_violations"),
    [
        ("attention", "scaled_dot_product_attention", 1),
        ("gate", "silu", 1),
        ("norm", "layer_norm", 2),
        ("self_gating", "operator.mul", 1),
    ],
)
def test_switching_a_rule_off_leaves_its_ops_uncertified(switch, broken_op, n_violations):
    model = build(TinyBlock())
    with pytest.warns(LibraWarning, match=broken_op):
        gm = libra_transform(model, rules=libra(**{switch: False}))
    report = gm.libra_report
    assert report.rules == tuple(rule for rule in RULES if rule != switch)
    assert report.counts == {rule: n for rule, n in FULL.items() if rule != switch}
    assert all(r.rule != switch for r in report.rewrites)
    assert len(report.violations) == n_violations
    assert all(broken_op in u.op for u in report.violations)
    assert broken_op in str(report)
    x = random_input()
    assert torch.equal(model(x), gm(x))
    assert completeness_error(gm, x[:1], biases(model)) > 1e-3


def test_all_rules_off_is_the_vanilla_backward():
    model = build(TinyBlock())
    off = libra(attention=False, gate=False, self_gating=False, norm=False, elementwise=False)
    assert off == ()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LibraWarning)
        gm = libra_transform(model, rules=off)
    assert gm.libra_report.counts == {}
    assert gm.libra_report.rewrites == []
    assert len(gm.libra_report.violations) == 5  # sdpa, silu, two layer_norms, the product
    x = random_input()
    assert torch.equal(model(x), gm(x))
    params = list(model.parameters())
    for g, w in zip(gradients(gm, x, params), gradients(model, x, params), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


# --- F.softmax with a dtype (canonicalised to torch.softmax with the dtype kept) ----------------


def test_attention_with_softmax_dtype():
    class SoftmaxDtype(Attention):
        def forward(self, h):
            q, k, v = self.split(h)
            scores = q @ k.transpose(-2, -1) * self.scale + self.mask
            return self.merge(F.softmax(scores, dim=-1, dtype=torch.float64) @ v)

    assert_rule_form(build(SoftmaxDtype("method", "float")), counts(attention=1))
