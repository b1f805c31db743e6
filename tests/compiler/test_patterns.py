"""Patterns of real models beyond the plain ViT, each proved three ways (float64, eval mode).

Forms: eval BatchNorm (and a ResNet-like CNN with nothing to rewrite), GroupNorm and
channels-first LayerNorms, relative position biases inside the softmax, talking-heads attention,
cross-covariance attention, attention-pooling heads (a latent query, timm's AttentionPoolLatent,
open_clip's AttentionalPooler and cross-attention nn.MultiheadAttention), and gated
convolutions / GLUs. For each:

(a) the rewritten forward is bit-identical to the model's (``torch.equal``);
(b) its input and parameter gradients equal a reference written in this file, with the
    ``.detach()`` placements written by hand (it never calls libragrad_fx);
(c) FullGrad-completeness holds on the rewritten graph (< 1e-6) and fails on the model (> 1e-3),
    the biases being listed per module: the parameters that enter additively on an
    input-dependent path.

Real timm models (random weights) are smoke-tested too: rewrite counts, the certificate, and
the forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip.transformer import AttentionalPooler
from timm.layers import AttentionPoolLatent, GluMlp, GroupNorm, GroupNorm1, LayerNorm2d
from torch import Tensor, nn

import libragrad_fx
from libragrad_fx import LibraWarning, libra_transform
from libragrad_fx.runtime import mha, ops
from tests.harness import completeness_gap, gradients, jitter, readout

DT = torch.float64
D_IN, D, D_OUT, HEADS, TOKENS, BATCH = 6, 8, 3, 2, 5, 2
HEAD_DIM = D // HEADS
C_IN, C, SIDE = 3, 8, 4  # image sandwiches: channels in, channels of the block, height = width
EPS = 1e-5
RULES = ("attention", "gate", "elementwise", "norm", "self_gating")


pytestmark = pytest.mark.usefixtures("seeded")  # torch.manual_seed(0) before each test


# --- helpers -----------------------------------------------------------------------------------


def counts(**nonzero: int) -> dict[str, int]:
    return {rule: nonzero.get(rule, 0) for rule in RULES}


def bn_implicit_bias(bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """beta - mu * gamma / sqrt(var + eps): eval BatchNorm's whole bias per channel."""
    return bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)


def completeness_error(fn: Callable, x: Tensor, biases: list[Tensor],
                       batch_norms: tuple = ()) -> float:
    """|f - sum x df/dx - sum_b b df/db| / |f| for one sample.

    Eval BatchNorm adds beta and -mu*gamma/sqrt(var+eps): its bias term is
    (beta - mu*gamma/sqrt(var+eps)) . df/dbeta (df/dbeta is sum df/dy over positions), which is
    b df/db + mu df/dmu, measured this way because F.batch_norm does not differentiate mu
    (a beta also listed in ``biases`` is counted once, here).
    """
    assert x.shape[0] == 1, "completeness is per sample"
    betas = [bn.bias for bn in batch_norms]
    biases = [b for b in biases if all(b is not beta for beta in betas)]
    x = x.detach().clone().requires_grad_(True)
    f = readout(fn(x))
    values = [*biases, *(bn_implicit_bias(bn) for bn in batch_norms)]
    return completeness_gap(f, x, [*biases, *betas], values)


def perturb(model: nn.Module) -> nn.Module:
    """Non-trivial values for every parameter, and running statistics for every BatchNorm."""
    jitter(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


def additive(model: nn.Module, skip: tuple[str, ...] = ()) -> list[Tensor]:
    """The parameters named ``...bias`` (minus ``skip``): the bias set of most toy modules."""
    return [p for n, p in model.named_parameters() if n.endswith("bias") and n not in skip]


def assert_three_ways(model: nn.Module, x: Tensor, reference: Callable, expected: dict,
                      biases: list[Tensor], batch_norms: tuple = (),
                      complete_before: bool = False) -> nn.Module:
    """(a), (b), (c) and the report; returns the rewritten graph."""
    gm = libra_transform(model, strict=True)
    report = gm.libra_report
    assert report.counts == expected
    assert report.violations == [] and report.complete

    assert torch.equal(model(x), gm(x)), "the forward must be bit-identical"
    with torch.no_grad():
        assert torch.equal(model(x), gm(x))

    names = ["input", *(n for n, _ in model.named_parameters())]
    params = list(model.parameters())
    got, want = gradients(gm, x, params), gradients(reference, x, params)
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"gradient of {name}")
    if any(expected.values()):
        assert not torch.allclose(got[0], gradients(model, x, params)[0])

    sample = x[:1]
    assert completeness_error(gm, sample, biases, batch_norms) < 1e-6
    vanilla = completeness_error(model, sample, biases, batch_norms)
    assert vanilla < 1e-6 if complete_before else vanilla > 1e-3
    return gm


def tokens(batch: int = BATCH) -> Tensor:
    return torch.randn(batch, TOKENS, D_IN, dtype=DT)


def image(batch: int = BATCH, channels: int = C_IN) -> Tensor:
    return torch.randn(batch, channels, SIDE, SIDE, dtype=DT)


class Sandwich(nn.Module):
    """Linear -> block -> Linear on tokens; ``reference`` uses the block's hand-written form."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(D_IN, D), block, nn.Linear(D, D_OUT)

    def forward(self, x):
        return self.out(self.block(self.inp(x)))

    def reference(self, x):
        return self.out(self.block.reference(self.inp(x)))


class ConvSandwich(nn.Module):
    """1x1 conv -> block -> 1x1 conv on images."""

    def __init__(self, block: nn.Module, out_channels: int = C):
        super().__init__()
        self.inp = nn.Conv2d(C_IN, C, 1)
        self.block = block
        self.out = nn.Conv2d(out_channels, D_OUT, 1)

    def forward(self, x):
        return self.out(self.block(self.inp(x)))

    def reference(self, x):
        return self.out(self.block.reference(self.inp(x)))


def build(model: nn.Module) -> nn.Module:
    return perturb(model.to(DT)).eval()


def shared(p: Tensor, n: int) -> Tensor:
    """The value of p with 1/n of its gradient (the self-gating reference)."""
    return p.detach() + (p - p.detach()) / n


def phi(h: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(h / math.sqrt(2)))


def ref_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5) -> Tensor:
    """(x - mu) / sqrt([var]cst + eps) * w + b."""
    dims = tuple(range(-len(normalized_shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    y = centred / torch.sqrt(centred.pow(2).mean(dims, keepdim=True) + eps).detach()
    y = y * weight if weight is not None else y
    return y + bias if bias is not None else y


def ref_gelu(x, approximate="none") -> Tensor:
    assert approximate == "none"
    return x * phi(x).detach()


def ref_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None) -> Tensor:
    """[softmax(q k^T * scale + mask)]cst @ v (float masks only)."""
    assert not is_causal and dropout_p == 0.0
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q.detach() @ k.detach().transpose(-2, -1) * scale
    if attn_mask is not None:
        scores = scores + attn_mask
    return scores.softmax(-1).detach() @ v


def mha_projections(m: nn.MultiheadAttention) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(w_q, w_k, w_v), (b_q, b_k, b_v) of ``m``: packed in in_proj_weight, or separate."""
    if m._qkv_same_embed_dim:
        weights = m.in_proj_weight.chunk(3)
    else:
        weights = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    return weights, m.in_proj_bias.chunk(3)


def heads(y: Tensor, b: int) -> Tensor:
    """(b, t, D) -> (b, HEADS, t, HEAD_DIM)."""
    return y.reshape(b, y.shape[1], HEADS, HEAD_DIM).transpose(1, 2)


@contextmanager
def patched_reference() -> Iterator[None]:
    """The hand-written LibraGrad functionals patched in, for real timm / open_clip layers."""
    patches = [(F, "scaled_dot_product_attention", ref_sdpa), (F, "gelu", ref_gelu),
               (F, "layer_norm", ref_layer_norm)]
    with ExitStack() as stack:
        for owner, name, fn in patches:
            stack.enter_context(mock.patch.object(owner, name, fn))
        yield


# --- 1. BatchNorm in eval ----------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "shape"), [
    (nn.BatchNorm1d, (BATCH, C)), (nn.BatchNorm1d, (BATCH, C, 7)),
    (nn.BatchNorm2d, (BATCH, C, SIDE, SIDE)), (nn.BatchNorm3d, (BATCH, C, 2, 3, 3)),
])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_is_canonicalised_to_f_batch_norm(cls, shape, affine):
    model = build(nn.Sequential(cls(C, affine=affine, momentum=None), nn.ReLU()))
    gm = libra_transform(model, strict=True)
    assert gm.libra_report.counts == counts()
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.batch_norm]
    assert len(calls) == 1 and not [n for n in gm.graph.nodes if n.op == "call_module"]
    (call,) = calls
    bn = model[0]
    x_node, mean, var, weight, bias, training, momentum, eps = call.args
    assert (mean.target, var.target) == ("0.running_mean", "0.running_var")
    if affine:
        assert (weight.target, bias.target) == ("0.weight", "0.bias")
    else:
        assert weight is None and bias is None
    assert (training, momentum, eps) == (False, 0.0, bn.eps)
    x = torch.randn(shape, dtype=DT)
    assert torch.equal(model(x), gm(x))
    with torch.inference_mode():
        assert torch.equal(model(x), gm(x))
    # the graph reads the model's buffers: a change is seen
    with torch.no_grad():
        bn.running_mean.add_(1.0)
        assert torch.equal(model(x), gm(x))


def test_batch_norm_with_batch_statistics_is_not_certified():
    """Without running statistics, eval BatchNorm normalises by the batch: not affine."""
    model = build(nn.Sequential(nn.Conv2d(C_IN, C, 1),
                                nn.BatchNorm2d(C, track_running_stats=False)))
    with pytest.warns(LibraWarning, match="BatchNorm2d"):
        gm = libra_transform(model)
    assert not gm.libra_report.complete
    assert [v.op for v in gm.libra_report.violations] == ["BatchNorm2d"]
    x = image()
    assert torch.equal(model(x), gm(x))


class TinyResNet(nn.Module):
    """conv-BN-ReLU-maxpool stem, one residual block, average pool, linear head.

    Locally affine everywhere, so complete as it is: nothing to rewrite. ``reference`` writes
    BatchNorm out with its running mean as an argument, so that it can be made a leaf.
    """

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(C_IN, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2 = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.conv3, self.bn3 = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.relu = nn.ReLU()
        self.head = nn.Linear(C, D_OUT)

    def batch_norms(self) -> tuple[nn.BatchNorm2d, ...]:
        return self.bn1, self.bn2, self.bn3

    def forward(self, x):
        return self.body(x, lambda i, h: self.batch_norms()[i](h))

    def body(self, x, bn: Callable[[int, Tensor], Tensor]) -> Tensor:
        h = self.pool(self.relu(bn(0, self.conv1(x))))
        r = self.relu(bn(1, self.conv2(h)))
        h = self.relu(h + bn(2, self.conv3(r)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def reference(self, x, means=None):
        """BatchNorm written out: (x - mu) / sqrt(var + eps) * gamma + beta."""
        means = means or [m.running_mean for m in self.batch_norms()]

        def bn(i, h):
            m = self.batch_norms()[i]
            scale = (m.weight / torch.sqrt(m.running_var + m.eps))[:, None, None]
            return (h - means[i][:, None, None]) * scale + m.bias[:, None, None]

        return self.body(x, bn)


def test_resnet_like_cnn_has_nothing_to_rewrite_and_is_complete():
    model = build(TinyResNet())
    x = torch.randn(BATCH, C_IN, 8, 8, dtype=DT)
    bns = model.batch_norms()
    gm = assert_three_ways(model, x, model.reference, counts(), additive(model), bns,
                           complete_before=True)
    modules = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert all(isinstance(m, nn.MaxPool2d) for m in modules)  # BatchNorm and ReLU are calls
    # without the running means' contribution the sum is short: they are bias leaves
    short = completeness_error(gm, x[:1], additive(model))
    assert short > 1e-3

    # The reference with each running mean a requires-grad leaf (in a copy): b df/db + mu df/dmu
    # equals the implicit bias term used above.
    means = [m.running_mean.detach().clone().requires_grad_(True) for m in bns]
    sample = x[:1].clone().requires_grad_(True)
    f = readout(model.reference(sample, means))
    betas = [m.bias for m in bns]
    gx, *grads = torch.autograd.grad(f, [sample, *means, *betas, model.head.bias])
    g_means, g_betas, g_head = grads[:3], grads[3:6], grads[6]
    leaves = sum((mu * g).sum() for mu, g in zip(means, g_means, strict=True)) + sum(
        (b * g).sum() for b, g in zip(betas, g_betas, strict=True))
    implicit = sum((bn_implicit_bias(m) * g).sum() for m, g in zip(bns, g_betas, strict=True))
    torch.testing.assert_close(leaves, implicit, rtol=1e-10, atol=1e-12)
    total = (sample * gx).sum() + leaves + (model.head.bias * g_head).sum()
    assert ((f - total).abs() / f.abs()).item() < 1e-10


# --- 2. GroupNorm and channels-first LayerNorm -------------------------------------------------


def ref_group_norm(x: Tensor, groups: int, weight, bias, eps: float) -> Tensor:
    """Per group: (x - mu) / sqrt([var]cst + eps), then the per-channel affine."""
    n = x.shape[0]
    g = x.reshape(n, groups, -1)
    centred = g - g.mean(-1, keepdim=True)
    y = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps).detach()
    y = y.reshape(x.shape)
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    y = y * weight.reshape(per_channel) if weight is not None else y
    return y + bias.reshape(per_channel) if bias is not None else y


def ref_channel_norm(x: Tensor, weight, bias, eps: float) -> Tensor:
    """Layer norm over the channels of NCHW: (x - mu_c) / sqrt([var_c]cst + eps) * w + b."""
    centred = x - x.mean(1, keepdim=True)
    y = centred / torch.sqrt(centred.pow(2).mean(1, keepdim=True) + eps).detach()
    return y * weight[:, None, None] + bias[:, None, None]


class ChannelNorm(nn.Module):
    """A normalisation of NCHW feature maps in one of its forms."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.groups = {"nn.GroupNorm": 4, "nn.GroupNorm-no-affine": 2, "F.group_norm": 2,
                       "timm.GroupNorm1": 1, "timm.GroupNorm": 2}.get(form)
        if form == "nn.GroupNorm":
            self.norm = nn.GroupNorm(4, C, eps=EPS)
        elif form == "nn.GroupNorm-no-affine":
            self.norm = nn.GroupNorm(2, C, eps=EPS, affine=False)
        elif form == "timm.GroupNorm1":
            self.norm = GroupNorm1(C, eps=EPS)
        elif form == "timm.GroupNorm":
            self.norm = GroupNorm(C, num_groups=2, eps=EPS)
        elif form == "timm.LayerNorm2d":
            self.norm = LayerNorm2d(C, eps=EPS)
        else:
            self.weight, self.bias = nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))

    def forward(self, x):
        form = self.form
        if form.startswith(("nn.", "timm.")):
            return self.norm(x)
        if form == "F.group_norm":
            return F.group_norm(x, 2, self.weight, self.bias, EPS)
        if form == "written-mean-var":  # ConvNeXt's channels_first LayerNorm
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / torch.sqrt(s + EPS)
            return self.weight[:, None, None] * x + self.bias[:, None, None]
        if form == "written-sqm-rsqrt":  # timm's _layer_norm_cf_sqm
            u = x.mean(dim=1, keepdim=True)
            s = ((x * x).mean(dim=1, keepdim=True) - (u * u)).clamp(0)
            x = (x - u) * torch.rsqrt(s + EPS)
            return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if form == "written-var_mean":  # timm's _layer_norm_cf
            s, u = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
            x = (x - u) * torch.rsqrt(s + EPS)
            return x * self.weight[:, None, None] + self.bias[:, None, None]
        raise ValueError(form)

    def reference(self, x):
        owner = getattr(self, "norm", self)
        weight, bias = getattr(owner, "weight", None), getattr(owner, "bias", None)
        if self.groups is not None:
            return ref_group_norm(x, self.groups, weight, bias, EPS)
        return ref_channel_norm(x, weight, bias, EPS)


CHANNEL_NORMS = [
    ("nn.GroupNorm", "group_norm"), ("nn.GroupNorm-no-affine", "group_norm"),
    ("F.group_norm", "group_norm"), ("timm.GroupNorm1", "group_norm"),
    ("timm.GroupNorm", "group_norm"), ("timm.LayerNorm2d", "layer_norm"),
    ("written-mean-var", "[sqrt]cst"), ("written-sqm-rsqrt", "[rsqrt]cst"),
    ("written-var_mean", "[rsqrt]cst"),
]


@pytest.mark.parametrize(("form", "action"), CHANNEL_NORMS)
def test_channel_norm(form, action):
    model = build(ConvSandwich(ChannelNorm(form)))
    gm = assert_three_ways(model, image(), model.reference, counts(norm=1), additive(model))
    (rewrite,) = gm.libra_report.rewrites
    assert action in rewrite.action


@pytest.mark.parametrize("shape", [(BATCH, C), (BATCH, C, 7), (BATCH, C, 3, 3),
                                   (BATCH, C, 2, 3, 3)])
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_libra_group_norm_operator(shape, groups):
    """The operator alone: F.group_norm's bits, the reference's input and affine gradients."""
    x = torch.randn(shape, dtype=DT, requires_grad=True)
    w = torch.randn(C, dtype=DT, requires_grad=True)
    b = torch.randn(C, dtype=DT, requires_grad=True)
    y = ops.libra_group_norm(x, groups, w, b, EPS)
    assert torch.equal(y, F.group_norm(x, groups, w, b, EPS))
    g = torch.randn(shape, dtype=DT)
    got = torch.autograd.grad(y, [x, w, b], g)
    want = torch.autograd.grad(ref_group_norm(x, groups, w, b, EPS), [x, w, b], g)
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    (gx,) = torch.autograd.grad(ops.libra_group_norm(x, groups, eps=EPS), [x], g)
    (rx,) = torch.autograd.grad(ref_group_norm(x, groups, None, None, EPS), [x], g)
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-12)


# --- 3. relative position bias inside the softmax ----------------------------------------------


def causal_mask(n: int = TOKENS) -> Tensor:
    return torch.full((n, n), float("-inf"), dtype=DT).triu(1)


class RelPosAttention(nn.Module):
    """softmax(q k^T * scale + table[index] (+ mask)) @ v, as timm's BEiT (and Swin, windowed).

    ``form``: "explicit" (softmax @ v), "sdpa" (the bias as attn_mask) or "windows" (Swin: the
    scores viewed per window and a window mask added before the softmax).
    """

    def __init__(self, form: str, masked: bool):
        super().__init__()
        self.form = form
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.relative_position_bias_table = nn.Parameter(torch.randn(2 * TOKENS - 1, HEADS))
        pos = torch.arange(TOKENS)
        self.register_buffer("relative_position_index", pos[:, None] - pos[None, :] + TOKENS - 1)
        self.register_buffer("mask", causal_mask() if masked else None)
        self.scale = HEAD_DIM ** -0.5

    def rel_pos_bias(self) -> Tensor:
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(TOKENS, TOKENS, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def split(self, h):
        b, t, _ = h.shape
        return self.qkv(h).reshape(b, t, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)

    def merge(self, out):
        b, _, t, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, t, D))

    def forward(self, h):
        q, k, v = self.split(h)
        if self.form == "sdpa":
            bias = self.rel_pos_bias()
            if self.mask is not None:
                bias = bias + self.mask
            return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self.rel_pos_bias()
        if self.form == "windows":  # one window per sample here: nW = 1
            b = attn.shape[0]
            attn = attn.view(b, 1, HEADS, TOKENS, TOKENS)
            if self.mask is not None:
                attn = attn + self.mask.unsqueeze(0).unsqueeze(1)
            attn = attn.view(-1, HEADS, TOKENS, TOKENS)
        elif self.mask is not None:
            attn = attn + self.mask
        attn = attn.softmax(dim=-1)
        return self.merge(attn @ v)

    def reference(self, h):
        q, k, v = self.split(h)
        scores = q.detach() @ k.detach().transpose(-2, -1) * self.scale + self.rel_pos_bias()
        if self.mask is not None:
            scores = scores + self.mask
        attn = scores.softmax(-1)
        # SDPA keeps its mask as it is (detaching it would change the CPU kernel, and so the
        # bits): there the table keeps its own parameter gradient; the input gradient and
        # completeness are the same either way.
        return self.merge((attn if self.form == "sdpa" else attn.detach()) @ v)


@pytest.mark.parametrize("form", ["explicit", "sdpa", "windows"])
@pytest.mark.parametrize("masked", [False, True])
def test_relative_position_bias(form, masked):
    model = build(Sandwich(RelPosAttention(form, masked)))
    gm = assert_three_ways(model, tokens(), model.reference, counts(attention=1), additive(model))
    (rewrite,) = gm.libra_report.rewrites
    assert rewrite.action == ("q, k detached; fused forward, backward dV = A^T dO; "
                              "linear_1 skips q, k rows" if form == "sdpa"
                              else "softmax probabilities constant")
    if form != "sdpa":  # the table lives inside the constant softmax: no gradient
        table = model.block.relative_position_bias_table
        assert torch.count_nonzero(gradients(gm, tokens(), [table])[1]) == 0


# --- 4. talking-heads attention and other linear maps of the probabilities -------------------


class TalkingHeads(nn.Module):
    """timm CaiT's TalkingHeadAttn: heads mixed by proj_l before the softmax, by proj_w after.

    ``form``: "talking-heads"; "scaled" (the probabilities times a per-head constant, then
    @ v); "pooling" (softmax weights over tokens times the tokens, summed: attention pooling
    by an elementwise product).
    """

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.proj_l, self.proj_w = nn.Linear(HEADS, HEADS), nn.Linear(HEADS, HEADS)
        self.head_gain = nn.Parameter(torch.ones(HEADS, 1, 1))
        self.score = nn.Linear(D, 1)
        self.attn_drop = nn.Dropout(0.1)
        self.scale = HEAD_DIM ** -0.5

    def split(self, h):
        b, t, _ = h.shape
        qkv = self.qkv(h).reshape(b, t, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        return qkv[0] * self.scale, qkv[1], qkv[2]

    def merge(self, out):
        b, _, t, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, t, D))

    def probabilities(self, h, cst):
        """The softmax output, constant where ``cst`` (the reference's detach)."""
        if self.form == "pooling":
            weights = self.score(h).softmax(dim=1)
            return weights.detach() if cst else weights
        q, k, v = self.split(h)
        if cst:
            q, k = q.detach(), k.detach()
        attn = q @ k.transpose(-2, -1)
        if self.form == "talking-heads":
            attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        return attn.detach() if cst else attn

    def attend(self, h, attn):
        if self.form == "pooling":
            return (attn * h).sum(1, keepdim=True).expand_as(h) + h
        v = self.split(h)[2]
        if self.form == "talking-heads":
            attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            attn = self.attn_drop(attn)
        else:
            attn = attn * self.head_gain
        return self.merge(attn @ v)

    def forward(self, h):
        return self.attend(h, self.probabilities(h, cst=False))

    def reference(self, h):
        return self.attend(h, self.probabilities(h, cst=True))


@pytest.mark.parametrize("form", ["talking-heads", "scaled", "pooling"])
def test_softmax_through_linear_maps(form):
    model = build(Sandwich(TalkingHeads(form)))
    # proj_w.bias multiplies v (not additive on an input-dependent path); proj_l.bias is inside
    # the softmax: neither is a bias of the completeness sum.
    biases = additive(model, skip=("block.proj_w.bias", "block.proj_l.bias"))
    gm = assert_three_ways(model, tokens(), model.reference, counts(attention=1), biases)
    (rewrite,) = gm.libra_report.rewrites
    assert rewrite.op == "torch.softmax"
    assert rewrite.action == "softmax probabilities constant (linear maps of them multiply V)"
    # the head mixing after the softmax keeps its parameter gradients (only the softmax is cst)
    if form == "talking-heads":
        w = model.block.proj_w.weight
        assert torch.count_nonzero(gradients(gm, tokens(), [w])[1]) > 0


def test_plain_softmax_matmul_keeps_its_form():
    """softmax(...) @ v through reshapes only is still detached at the matmul, as before."""
    model = build(Sandwich(RelPosAttention("explicit", masked=False)))
    gm = libra_transform(model, strict=True)
    (rewrite,) = gm.libra_report.rewrites
    assert rewrite.action == "softmax probabilities constant"
    assert rewrite.op == "operator.matmul"


# --- 5. cross-covariance attention (XCiT) ------------------------------------------------------


class XCA(nn.Module):
    """timm XCiT's XCA: q and k L2-normalised over tokens, (q k^T) * temperature over channels."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.temperature = nn.Parameter(torch.ones(HEADS, 1, 1))
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def split(self, h):
        b, n, c = h.shape
        qkv = self.qkv(h).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 4, 1)
        return qkv.unbind(0)

    def forward(self, h):
        b, n, c = h.shape
        q, k, v = self.split(h)
        if self.fused:
            q = F.normalize(q, dim=-1) * self.temperature
            k = F.normalize(k, dim=-1)
            x = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        else:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            attn = (q @ k.transpose(-2, -1)) * self.temperature
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.permute(0, 3, 1, 2).reshape(b, n, c))

    def reference(self, h):
        b, n, c = h.shape
        q, k, v = self.split(h)
        q = F.normalize(q.detach(), dim=-1)
        k = F.normalize(k.detach(), dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return self.proj((attn.detach() @ v).permute(0, 3, 1, 2).reshape(b, n, c))


@pytest.mark.parametrize("fused", [False, True])
def test_cross_covariance_attention(fused):
    """XCA alone is complete even without the rule: q and k are L2-normalised, so the scores
    have Euler degree 0 (a softmax of them is allowed) and the output is linear in v. The rule
    still makes the probabilities constant (LibraGrad's attention backward), which keeps
    completeness and changes the gradient; it matters once the scores are not scale-free."""
    model = build(Sandwich(XCA(fused)))
    gm = assert_three_ways(model, tokens(), model.reference, counts(attention=1), additive(model),
                           complete_before=True)
    # the normalisations of q and k feed only the (now constant) probabilities: no norm rewrite
    assert [r.rule for r in gm.libra_report.rewrites] == ["attention"]


# --- 6. attention pooling ----------------------------------------------------------------------


class LatentPool(nn.Module):
    """A learned latent query attending over the tokens (k, v from x), SDPA or explicit."""

    def __init__(self, fused: bool, latents: int = 2):
        super().__init__()
        self.fused, self.latents = fused, latents
        self.latent = nn.Parameter(torch.randn(1, latents, D))
        self.q, self.kv, self.proj = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, D)

    def qkv(self, h):
        b, n, _ = h.shape
        q = self.q(self.latent.expand(b, -1, -1))
        q = q.reshape(b, self.latents, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = self.kv(h).reshape(b, n, 2, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def merge(self, out):
        b = out.shape[0]
        return self.proj(out.transpose(1, 2).reshape(b, self.latents, D))

    def forward(self, h):
        q, k, v = self.qkv(h)
        if self.fused:
            return self.merge(F.scaled_dot_product_attention(q, k, v))
        attn = (q * HEAD_DIM ** -0.5) @ k.transpose(-2, -1)
        return self.merge(attn.softmax(dim=-1) @ v)

    def reference(self, h):
        return self.merge(ref_sdpa(*self.qkv(h)))


@pytest.mark.parametrize("fused", [False, True])
def test_latent_query_pooling(fused):
    model = build(Sandwich(LatentPool(fused)))
    assert_three_ways(model, tokens(), model.reference, counts(attention=1), additive(model))


class TimmPool(nn.Module):
    """timm's AttentionPoolLatent (latent query, k/v from x, GELU MLP) after a linear layer."""

    def __init__(self, fused: bool):
        super().__init__()
        self.inp = nn.Linear(D_IN, D)
        self.pool = AttentionPoolLatent(D, num_heads=HEADS, mlp_ratio=2.0)
        self.pool.fused_attn = fused
        self.out = nn.Linear(D, D_OUT)

    def forward(self, x):
        return self.out(self.pool(self.inp(x)))

    def reference(self, x):
        fused = self.pool.fused_attn
        try:  # the explicit form is the same function: compare it with the patched fused one
            self.pool.fused_attn = True
            with patched_reference():
                return self(x)
        finally:
            self.pool.fused_attn = fused


@pytest.mark.parametrize("fused", [False, True])
def test_timm_attention_pool_latent(fused):
    model = build(TimmPool(fused))
    # the latent's projection bias is not on an input-dependent path
    assert_three_ways(model, tokens(), model.reference, counts(attention=1, gate=1),
                      additive(model, skip=("pool.q.bias",)))


class ClipPool(nn.Module):
    """open_clip's AttentionalPooler: nn.MultiheadAttention from learned queries to the tokens
    (cross-attention, query != key = value), LayerNorms on both sides."""

    def __init__(self, context_dim: int):
        super().__init__()
        self.inp = nn.Linear(D_IN, context_dim)
        self.pool = AttentionalPooler(D, context_dim, n_head=HEADS, n_queries=3)
        self.out = nn.Linear(D, D_OUT)

    def forward(self, x):
        return self.out(self.pool(self.inp(x)))

    def reference(self, x):
        pool, m = self.pool, self.pool.attn
        h = self.inp(x)
        b = h.shape[0]
        ctx = ref_layer_norm(h, pool.ln_k.normalized_shape, pool.ln_k.weight, pool.ln_k.bias,
                             pool.ln_k.eps)
        query = ref_layer_norm(pool.query, pool.ln_q.normalized_shape, pool.ln_q.weight,
                               pool.ln_q.bias, pool.ln_q.eps)
        (w_q, w_k, w_v), (b_q, b_k, b_v) = mha_projections(m)
        q = heads(F.linear(query, w_q, b_q).unsqueeze(0).expand(b, -1, -1), b)
        k, v = heads(F.linear(ctx, w_k, b_k), b), heads(F.linear(ctx, w_v, b_v), b)
        out = ref_sdpa(q, k, v).transpose(1, 2).reshape(b, -1, D)
        return self.out(m.out_proj(out))


@pytest.mark.parametrize("context_dim", [D, 6], ids=["packed", "separate-kdim"])
def test_open_clip_attentional_pooler(context_dim):
    model = build(ClipPool(context_dim))
    # the queries' LayerNorm is not on an input-dependent path: its bias is not a bias site
    gm = assert_three_ways(model, tokens(), model.reference, counts(attention=1, norm=1),
                           additive(model, skip=("pool.ln_q.bias",)))
    rules = sorted((r.rule, r.module) for r in gm.libra_report.rewrites)
    assert rules == [("attention", "pool.attn"), ("norm", "pool.ln_k")]


class CrossAttention(nn.Module):
    """nn.MultiheadAttention with query != key = value (a learned query, or a second input)."""

    def __init__(self, batch_first: bool, kdim: int | None, need_weights: bool, masked: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.query = nn.Parameter(torch.randn(3, D))
        self.need_weights = need_weights
        self.register_buffer("mask", torch.randn(3, TOKENS) if masked else None)

    def forward(self, x):
        b = x.shape[0] if self.mha.batch_first else x.shape[1]
        q = self.query.unsqueeze(0 if self.mha.batch_first else 1)
        q = q.expand(b, -1, -1) if self.mha.batch_first else q.expand(-1, b, -1)
        return self.mha(q, x, x, need_weights=self.need_weights, attn_mask=self.mask)


MHA_CROSS = [
    pytest.param(bf, kdim, nw, masked,
                 id=f"batch_first={bf}-kdim={kdim}-need_weights={nw}-masked={masked}")
    for bf in (True, False) for kdim in (None, 6) for nw in (True, False)
    for masked in (False, True)
]


@pytest.mark.parametrize(("batch_first", "kdim", "need_weights", "masked"), MHA_CROSS)
@pytest.mark.parametrize("rules", ["libra", "vanilla"])
def test_cross_attention_mha_is_bit_identical(batch_first, kdim, need_weights, masked, rules):
    """In every autograd mode, both the canonical and the LibraGrad form return the module's
    own output and weights, bit for bit."""
    model = perturb(CrossAttention(batch_first, kdim, need_weights, masked).to(DT)).eval()
    if rules == "libra":
        gm = libra_transform(model)
        assert gm.libra_report.counts == counts(attention=1)
    else:
        with pytest.warns(LibraWarning):  # the vanilla graph is not complete
            gm = libra_transform(model, rules=())
    width = kdim or D
    shape = (BATCH, TOKENS, width) if batch_first else (TOKENS, BATCH, width)
    x = torch.randn(shape, dtype=DT)
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with mode():
            (out, weights), (got, got_weights) = model(x), gm(x)
        assert torch.equal(out, got), mode.__name__
        if need_weights:
            assert torch.equal(weights, got_weights), mode.__name__
        else:
            assert weights is None and got_weights is None
    x.requires_grad_(True)
    assert torch.equal(model(x)[0], gm(x)[0])


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_with_distinct_key_and_value_is_bit_identical(batch_first, need_weights):
    """query, key and value three different tensors (the in-projection's general branch)."""

    class ThreeInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(D, HEADS, batch_first=batch_first)

        def forward(self, q, k, v):
            return self.mha(q, k, v, need_weights=need_weights)

    model = perturb(ThreeInputs().to(DT)).eval()
    gm = libra_transform(model, strict=True)
    shape = (BATCH, TOKENS, D) if batch_first else (TOKENS, BATCH, D)
    q, k, v = (torch.randn(shape, dtype=DT) for _ in range(3))
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with mode():
            out, got = model(q, k, v), gm(q, k, v)
        assert torch.equal(out[0], got[0]), mode.__name__
        assert (out[1] is None and got[1] is None) or torch.equal(out[1], got[1])
    # gradient through v only
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    grads = torch.autograd.grad(readout(gm(*inputs)), inputs, allow_unused=True)
    assert grads[0] is None and grads[1] is None
    assert torch.count_nonzero(grads[2]) > 0


def test_cross_attention_mha_unbatched_is_bit_identical():
    model = perturb(CrossAttention(False, None, False, False).to(DT)).eval()

    class Unbatched(nn.Module):
        def __init__(self, mha_module):
            super().__init__()
            self.mha = mha_module

        def forward(self, q, x):
            return self.mha(q, x, x, need_weights=False)[0]

    wrapper = Unbatched(model.mha).eval()
    gm = libra_transform(wrapper)
    q, x = torch.randn(3, D, dtype=DT), torch.randn(TOKENS, D, dtype=DT)
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with mode():
            assert torch.equal(wrapper(q, x), gm(q, x)), mode.__name__


@pytest.mark.parametrize("kdim", [None, 6], ids=["packed", "separate-kdim"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_mha_gradients(kdim, batch_first):
    """The LibraGrad form's gradients: probabilities constant, gradient through v only."""
    model = perturb(CrossAttention(batch_first, kdim, need_weights=False, masked=True)
                    .to(DT)).eval()
    gm = libra_transform(model, strict=True)
    width = kdim or D
    m = model.mha

    def reference(x):
        kv = x if batch_first else x.transpose(0, 1)
        b = kv.shape[0]
        (w_q, w_k, w_v), (b_q, b_k, b_v) = mha_projections(m)
        q = heads(F.linear(model.query, w_q, b_q).unsqueeze(0).expand(b, -1, -1), b)
        k, v = heads(F.linear(kv, w_k, b_k), b), heads(F.linear(kv, w_v, b_v), b)
        out = m.out_proj(ref_sdpa(q, k, v, model.mask).transpose(1, 2).reshape(b, -1, D))
        return out if batch_first else out.transpose(0, 1)

    shape = (BATCH, TOKENS, width) if batch_first else (TOKENS, BATCH, width)
    x = torch.randn(shape, dtype=DT)
    params = list(model.parameters())
    for g, w in zip(gradients(gm, x, params), gradients(reference, x, params), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


# --- 7. multihead_attention honours the tensors it is given --------------------------------


def _mha_args(m: nn.MultiheadAttention) -> list[Tensor]:
    params = [m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias]
    if not m._qkv_same_embed_dim:
        params += [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
    return params


@pytest.mark.parametrize("kdim", [None, 6], ids=["packed", "separate-kdim"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("op", ["multihead_attention", "libra_multihead_attention"])
def test_multihead_attention_honours_substituted_parameters(kdim, batch_first, op):
    fn = getattr(mha, op)
    m = perturb(nn.MultiheadAttention(D, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim)
                .to(DT)).eval()
    width = kdim or D
    shape = (BATCH, TOKENS) if batch_first else (TOKENS, BATCH)
    q = torch.randn(*shape, D, dtype=DT)
    kv = torch.randn(*shape, width, dtype=DT)
    own = _mha_args(m)
    kwargs = {"need_weights": False}
    expected = m(q, kv, kv, **kwargs)[0]
    # the module's own tensors: the module's call
    assert torch.equal(fn(m, q, kv, kv, *own, **kwargs)[0], expected)
    # equal copies, as fresh leaves: the same output, and their gradients are the module's
    leaves = [p.detach().clone().requires_grad_(True) if p is not None else None for p in own]
    out = fn(m, q, kv, kv, *leaves, **kwargs)[0]
    assert torch.equal(out, expected)
    target = torch.randn_like(out)
    present = [i for i, p in enumerate(own) if p is not None]
    got = torch.autograd.grad((out * target).sum(), [leaves[i] for i in present],
                              allow_unused=True)
    want = torch.autograd.grad((fn(m, q, kv, kv, *own, **kwargs)[0] * target).sum(),
                               [own[i] for i in present], allow_unused=True)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    # other values are used, not the module's: the output moves with a changed bias
    changed = [p.detach().clone() if p is not None else None for p in own]
    changed[3] = changed[3] + 1.0  # out_proj bias
    for mode in (torch.enable_grad, torch.no_grad):
        with mode():
            moved = fn(m, q, kv, kv, *changed, **kwargs)[0]
        torch.testing.assert_close(moved, expected + 1.0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("context_dim", [D, 6], ids=["packed", "separate-kdim"])
def test_completeness_check_substitutes_mha_biases(context_dim):
    """libragrad_fx.completeness_error replaces in_proj_bias and out_proj_bias by fresh leaves
    where multihead_attention reads them: on the vanilla graph (the module's own call otherwise)
    its bias term must equal the one measured on the model's parameters."""
    model = build(ClipPool(context_dim))
    x = tokens()[:1]
    biases = additive(model, skip=("pool.ln_q.bias",))  # the query's LayerNorm: not additive
    vanilla = completeness_error(model, x, biases)
    measured = libragrad_fx.completeness_error(model, x, readout)
    assert vanilla > 1e-3
    assert measured.relative.item() == pytest.approx(vanilla, rel=1e-9)
    gm = libra_transform(model, strict=True)
    assert libragrad_fx.completeness_error(gm, x, readout).relative.item() < 1e-10


# --- 8. gated convolutions and GLUs ------------------------------------------------------------


class Gated(nn.Module):
    """A gated unit on NCHW feature maps (or tokens for timm's GluMlp)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.a, self.b = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 3, padding=1)
        self.both = nn.Conv2d(C, 2 * C, 1)
        self.act = {"conv*gelu": nn.GELU(), "conv*silu": nn.SiLU()}.get(form, nn.Identity())
        self.glu = nn.GLU(dim=1)
        self.fc1, self.fc2 = nn.Conv2d(C, 4, 1), nn.Conv2d(4, C, 1)
        self.mlp = GluMlp(D, 2 * D, act_layer=nn.Sigmoid) if form == "timm.GluMlp" else None

    def forward(self, h):
        form = self.form
        if form in ("conv*gelu", "conv*silu"):
            return self.a(h) * self.act(self.b(h))
        if form == "conv*sigmoid(conv)":
            return self.a(h) * torch.sigmoid(self.b(h))
        if form == "chunk-GLU":
            x1, x2 = self.both(h).chunk(2, dim=1)
            return x1 * x2.sigmoid()
        if form == "nn.GLU":
            return self.glu(self.both(h))
        if form == "F.glu":
            return F.glu(self.both(h), dim=1)
        if form == "squeeze-excitation":
            s = self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True))))
            return h * torch.sigmoid(s)
        if form == "timm.GluMlp":
            return self.mlp(h)
        raise ValueError(form)

    def reference(self, h):
        form = self.form
        if form == "conv*gelu":
            b = self.b(h)
            return shared(self.a(h) * (b * phi(b).detach()), 2)
        if form == "conv*silu":
            b = self.b(h)
            return shared(self.a(h) * (b * torch.sigmoid(b).detach()), 2)
        if form == "conv*sigmoid(conv)":
            return self.a(h) * torch.sigmoid(self.b(h)).detach()
        if form in ("chunk-GLU", "nn.GLU", "F.glu"):
            x1, x2 = self.both(h).chunk(2, dim=1)
            return x1 * torch.sigmoid(x2).detach()
        if form == "squeeze-excitation":
            s = self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True))))
            return h * torch.sigmoid(s).detach()
        x1, x2 = self.mlp.fc1(h).chunk(2, dim=-1)
        return self.mlp.fc2(x1 * torch.sigmoid(x2).detach())


GATED = [
    ("conv*gelu", counts(gate=1, self_gating=1), "1/2"),
    ("conv*silu", counts(gate=1, self_gating=1), "1/2"),
    ("conv*sigmoid(conv)", counts(gate=1), "sigmoid gate of another branch"),
    ("chunk-GLU", counts(gate=1), "sigmoid gate of another branch"),
    ("nn.GLU", counts(gate=1), "(GLU)"),
    ("F.glu", counts(gate=1), "(GLU)"),
    ("squeeze-excitation", counts(gate=1), "sigmoid gate of another branch"),
    ("timm.GluMlp", counts(gate=1), "sigmoid gate of another branch"),
]


@pytest.mark.parametrize(("form", "expected", "action"), GATED)
def test_gated_units(form, expected, action):
    if form == "timm.GluMlp":
        model, x = build(Sandwich(Gated(form))), tokens()
    else:
        model, x = build(ConvSandwich(Gated(form))), image()
    gm = assert_three_ways(model, x, model.reference, expected, additive(model))
    assert any(action in r.action for r in gm.libra_report.rewrites)


def test_libra_glu_operator():
    for dim in (1, -1):
        x = torch.randn(BATCH, 2 * C, 3, 4, dtype=DT, requires_grad=True)
        y = ops.libra_glu(x, dim)
        assert torch.equal(y, F.glu(x, dim))
        g = torch.randn_like(y)
        a, b = x.chunk(2, dim)
        (want,) = torch.autograd.grad(a * torch.sigmoid(b).detach(), [x], g)
        (got,) = torch.autograd.grad(y, [x], g)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# --- real timm models (random weights) ---------------------------------------------------------


SMOKE = [
    # name, create_model kwargs, expected counts, input side
    ("resnet18", {}, counts(), 64),
    ("efficientnet_b0", {}, counts(gate=65), 64),  # 49 SiLU, 16 squeeze-excitation gates
    # XCiT: BatchNorm and GELU in the conv patch embedding and the local patch interaction,
    # cross-covariance attention, two class-attention blocks
    ("xcit_nano_12_p16_224", {"depth": 2}, counts(attention=4, gate=9, norm=11), 224),
    ("cait_xxs24_224", {"depth": 2}, counts(attention=4, gate=4, norm=9), 224),
    ("beit_base_patch16_224", {"depth": 2, "embed_dim": 64, "num_heads": 2},
     counts(attention=2, gate=2, norm=5), 224),
    ("convnext_atto", {}, counts(gate=12, norm=17), 64),
    ("poolformer_s12", {}, counts(gate=12, norm=25), 64),
    ("vit_tiny_patch16_224", {"global_pool": "map", "depth": 2},
     counts(attention=3, gate=3, norm=6), 224),
]


@pytest.mark.parametrize(("name", "kwargs", "expected", "side"), SMOKE,
                         ids=[s[0] for s in SMOKE])
def test_real_model_smoke(name, kwargs, expected, side):
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    gm = libra_transform(model, strict=True)
    report = gm.libra_report
    assert report.counts == expected
    assert report.violations == [] and report.complete
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        assert torch.equal(model(x), gm(x))


def test_in_place_activation_after_batch_norm_runs_with_gradients():
    # the gradient fix after eval batch norm must not hand out a view: ReLU(inplace) follows
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(inplace=True)).eval()
    gm = libra_transform(model)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    out = gm(x)
    assert torch.equal(out, model(x))
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(grad, expected)
