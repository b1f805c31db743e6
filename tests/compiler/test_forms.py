"""The attention and normalisation forms of timm / open_clip models beyond the plain ones,
each proved three ways on a tiny hand-built module that reproduces it (float64, eval mode):

(a) the rewritten forward is bit-identical: ``torch.equal(model(x), gm(x))``;
(b) input and parameter gradients equal a reference written here with explicit ``.detach()``
    placements (never calling libragrad_fx);
(c) FullGrad-completeness < 1e-6 on the rewrite and > 1e-3 on the module, the biases being the
    parameters named ``...bias`` that enter additively on the rewrite's gradient path (a bias
    inside the probabilities, ``probs.*``, is part of a constant there; the module's check
    counts it too).

Then one test per real model, tiny configs: forward identical, certified, and
``completeness_error`` < 1e-4 in float32 and < 1e-10 in float64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from libragrad_fx import completeness_error, libra_transform
from tests.harness import Sandwich, completeness_gap, gradients, jitter, perturb, readout

D_IN, D, D_OUT, HEADS, BATCH = 6, 8, 3, 2, 2
HEAD_DIM = D // HEADS
GRID = 2  # the token grid is GRID x GRID
TOKENS = GRID * GRID

pytestmark = pytest.mark.usefixtures("seeded")  # torch.manual_seed(0) before each test


# --- helpers -----------------------------------------------------------------------------------


def gap(fn, x: torch.Tensor, bias_params: list[torch.Tensor]) -> float:
    x = x[:1].detach().clone().requires_grad_(True)
    return completeness_gap(readout(fn(x)), x, bias_params)


def biases(model: nn.Module, inside_probabilities: bool) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if name.endswith("bias")
            and (inside_probabilities or ".probs." not in name)]


def assert_form(block: nn.Module, rule: str, rewrites: int, tokens: int = TOKENS):
    """(a), (b), (c) and the report for one form; returns the rewritten graph."""
    model = jitter(Sandwich(block, D_IN, D, D_OUT).double()).eval()
    gm = libra_transform(model, strict=True)
    report = gm.libra_report
    assert report.complete and report.violations == []
    assert report.counts[rule] == rewrites
    assert sum(report.counts.values()) == rewrites, report.counts

    x = torch.randn(BATCH, tokens, D_IN, dtype=torch.float64)
    assert torch.equal(model(x), gm(x)), "the forward must be bit-identical"
    names = ["input", *(name for name, _ in model.named_parameters())]
    params = list(model.parameters())
    got, want = gradients(gm, x, params), gradients(model.reference, x, params)
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"gradient of {name}")
    assert not torch.allclose(got[0], gradients(model, x, params)[0])

    assert gap(gm, x, biases(model, inside_probabilities=False)) < 1e-6
    assert gap(model, x, biases(model, inside_probabilities=True)) > 1e-3
    return gm


def heads(t: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, H, T, hd)."""
    b, n, _ = t.shape
    return t.reshape(b, n, HEADS, HEAD_DIM).transpose(1, 2)


def merge(t: torch.Tensor) -> torch.Tensor:
    b, _, n, _ = t.shape
    return t.transpose(1, 2).reshape(b, n, D)


class QKV(nn.Module):
    """One fused projection to q, k, v of shape (B, H, T, hd), and an output projection."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def split(self, h):
        b, n, _ = h.shape
        return self.qkv(h).reshape(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)


# --- attention bias and talking heads around the softmax (EfficientFormerV2) ------------------


class TalkingHeads(QKV):
    """softmax(th1(q kᵀ·s + B[idx])), mixed again by th2 (1x1 convs over heads), times V."""

    def __init__(self):
        super().__init__()
        self.probs = nn.Module()
        self.probs.attention_bias = nn.Parameter(torch.zeros(HEADS, TOKENS))
        self.probs.th1 = nn.Conv2d(HEADS, HEADS, 1)
        self.probs.th2 = nn.Conv2d(HEADS, HEADS, 1)
        index = (torch.arange(TOKENS)[:, None] - torch.arange(TOKENS)[None]).abs()
        self.register_buffer("index", index, persistent=False)

    def probabilities(self, q, k):
        logits = (q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5
        logits = logits + self.probs.attention_bias[:, self.index]
        return self.probs.th1(logits).softmax(dim=-1)

    def forward(self, h):
        q, k, v = self.split(h)
        return self.proj(merge(self.probs.th2(self.probabilities(q, k)) @ v))

    def reference(self, h):
        q, k, v = self.split(h)
        return self.proj(merge(self.probs.th2(self.probabilities(q, k).detach()) @ v))


def test_talking_heads_attention():
    gm = assert_form(TalkingHeads(), "attention", 1)
    assert "linear maps" in gm.libra_report.rewrites[0].action


# --- an input-dependent logit term (SAM's decomposed relative positions) -----------------------


class RelPosAttention(QKV):
    """Attention whose additive logit term is computed from q: softmax(q kᵀ·s + rel(q)) V."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.probs = nn.Module()
        self.probs.rel_h = nn.Parameter(torch.randn(GRID, GRID, HEAD_DIM))
        self.probs.rel_w = nn.Parameter(torch.randn(GRID, GRID, HEAD_DIM))

    def rel_pos(self, q):
        b = q.shape[0]
        r_q = q.reshape(b, GRID, GRID, HEAD_DIM)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, self.probs.rel_h)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, self.probs.rel_w)
        return (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b, TOKENS, TOKENS)

    def attend(self, q, k, v, cut: bool):
        b = q.shape[0]
        q, k, v = (t.reshape(b * HEADS, TOKENS, HEAD_DIM) for t in (q, k, v))
        bias = self.rel_pos(q)
        if cut:
            q, k, bias = q.detach(), k.detach(), bias.detach()
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            out = ((q * HEAD_DIM**-0.5) @ k.transpose(-2, -1) + bias).softmax(dim=-1) @ v
        return self.proj(merge(out.reshape(b, HEADS, TOKENS, HEAD_DIM)))

    def forward(self, h):
        q, k, v = self.split(h)
        return self.attend(q, k, v, cut=False)

    def reference(self, h):
        q, k, v = self.split(h)
        return self.attend(q, k, v, cut=True)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "softmax"])
def test_relative_position_logits(fused):
    gm = assert_form(RelPosAttention(fused), "attention", 1)
    if fused:
        assert "mask (a logit term) constant" in gm.libra_report.rewrites[0].action


# --- F.multi_head_attention_forward called functionally (CLIP's attention pool) ---------------


class FunctionalMHA(nn.Module):
    """Attention pooling as open_clip writes it: separate projections, the biases concatenated,
    the functional called on (T, B, D) tokens; or with one packed in-projection."""

    def __init__(self, packed: bool, need_weights: bool):
        super().__init__()
        self.packed, self.need_weights = packed, need_weights
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, D) for _ in range(3))
        self.c_proj = nn.Linear(D, D)

    def weights(self):
        return [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]

    def forward(self, h):
        x = h.permute(1, 0, 2)
        packed = torch.cat(self.weights()) if self.packed else None
        separate = {} if self.packed else dict(zip(
            ("q_proj_weight", "k_proj_weight", "v_proj_weight"), self.weights(), strict=True))
        x, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=D, num_heads=HEADS,
            in_proj_weight=packed,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=not self.packed, training=self.training,
            need_weights=self.need_weights, **separate)
        return x.permute(1, 0, 2)

    def reference(self, h):
        q, k, v = (heads(p(h)) for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = (q.detach() @ k.detach().transpose(-2, -1)) / math.sqrt(HEAD_DIM)
        return self.c_proj(merge(scores.softmax(dim=-1) @ v))


@pytest.mark.parametrize(("packed", "need_weights"), [(False, False), (True, True)])
def test_functional_multi_head_attention(packed, need_weights):
    gm = assert_form(FunctionalMHA(packed, need_weights), "attention", 1)
    assert "functional MHA" in gm.libra_report.rewrites[0].action


# --- factorised attention with a convolutional position term (CoaT) ---------------------------


class FactorisedAttention(QKV):
    """scale·q (softmax_N(k)ᵀ v) + pad(q_img ⊙ dwconv(v_img)), a class token first."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(D, D, 3, padding=1, groups=D)

    def attend(self, h, cut: bool):
        q, k, v = self.split(h)
        weights = k.softmax(dim=2).transpose(-1, -2)
        q, weights = (q.detach(), weights.detach()) if cut else (q, weights)
        factor = q @ (weights @ v)
        b = h.shape[0]
        v_img = v[:, :, 1:, :].transpose(-1, -2).reshape(b, D, GRID, GRID)
        conv_v = self.conv(v_img).reshape(b, HEADS, HEAD_DIM, TOKENS).transpose(-1, -2)
        crpe = F.pad(q[:, :, 1:, :] * conv_v, (0, 0, 1, 0, 0, 0))
        return self.proj(merge(HEAD_DIM**-0.5 * factor + crpe))

    def forward(self, h):
        return self.attend(h, cut=False)

    def reference(self, h):
        return self.attend(h, cut=True)


def test_factorised_attention():
    gm = assert_form(FactorisedAttention(), "attention", 3, tokens=TOKENS + 1)
    actions = sorted(r.action for r in gm.libra_report.rewrites)
    assert sum("query constant" in a for a in actions) == 2


# --- gated positional self-attention (ConViT) -------------------------------------------------


class GatedPositional(nn.Module):
    """((1-σ(g))·softmax(q kᵀ·s) + σ(g)·softmax(pos(rel))) / its row sum, times V."""

    def __init__(self):
        super().__init__()
        self.qk, self.v, self.proj = nn.Linear(D, 2 * D), nn.Linear(D, D), nn.Linear(D, D)
        self.probs = nn.Module()
        self.probs.pos_proj = nn.Linear(3, HEADS)
        self.gating = nn.Parameter(torch.ones(HEADS))
        self.register_buffer("rel", torch.randn(1, TOKENS, TOKENS, 3), persistent=False)

    def attend(self, h, cut: bool):
        b, n, _ = h.shape
        q, k = self.qk(h).reshape(b, n, 2, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        patch = ((q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5).softmax(dim=-1)
        patch = patch.detach() if cut else patch
        pos = self.probs.pos_proj(self.rel).permute(0, 3, 1, 2)  # broadcast over the batch
        gate = self.gating.view(1, -1, 1, 1)
        attn = (1.0 - torch.sigmoid(gate)) * patch + torch.sigmoid(gate) * pos.softmax(dim=-1)
        attn = attn / attn.sum(dim=-1).unsqueeze(-1)
        return self.proj(merge(attn @ heads(self.v(h))))

    def forward(self, h):
        return self.attend(h, cut=False)

    def reference(self, h):
        return self.attend(h, cut=True)


def test_gated_positional_attention():
    assert_form(GatedPositional(), "attention", 1)


# --- global response normalisation (ConvNeXtV2) -----------------------------------------------


class GlobalResponseNorm(nn.Module):
    """x + b + w·(x·Nx), Nx = ‖x‖_space / (mean_c ‖x‖_space + eps), channels last.

    Nx is degree 0 in x up to eps, so the module is complete up to O(eps): a large eps makes
    the module's own incompleteness measurable (timm's 1e-6 would leave it at ~1e-6).
    """

    def __init__(self, eps: float = 1.0):
        super().__init__()
        self.eps = eps
        self.weight, self.bias = nn.Parameter(torch.zeros(D)), nn.Parameter(torch.zeros(D))

    def ratio(self, x):
        x_g = x.norm(p=2, dim=(1, 2), keepdim=True)
        return x_g / (x_g.mean(dim=-1, keepdim=True) + self.eps)

    def forward(self, h):
        x = h.reshape(h.shape[0], GRID, GRID, D)
        y = x + torch.addcmul(self.bias, self.weight, x * self.ratio(x))
        return y.reshape(h.shape)

    def reference(self, h):
        x = h.reshape(h.shape[0], GRID, GRID, D)
        y = x + torch.addcmul(self.bias, self.weight, x * self.ratio(x).detach())
        return y.reshape(h.shape)


def test_global_response_norm():
    gm = assert_form(GlobalResponseNorm(), "norm", 1)
    assert "response normalisation" in gm.libra_report.rewrites[0].action


# --- the real models, tiny configs -------------------------------------------------------------


def _timm(name: str, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


def _attention_pool():  # open_clip's RN50 class, a tiny config of it
    return ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=64, width=16)


REAL = {
    "convnextv2_atto": (_timm("convnextv2_atto", depths=(1,) * 4, dims=(8, 16, 32, 64)), 32),
    "efficientformerv2_s0": (_timm("efficientformerv2_s0", img_size=64, depths=(1, 1, 2, 2),
                                   embed_dims=(16, 16, 32, 32), num_vit=1), 64),
    "samvit": (_timm("samvit_base_patch16_224", img_size=64, depth=2, embed_dim=32,
                     num_heads=2, global_attn_indexes=(1,), window_size=2, neck_chans=16), 64),
    "coat_tiny": (_timm("coat_tiny", img_size=32, embed_dims=(32,) * 4,
                        serial_depths=(1,) * 4, parallel_depth=0), 32),
    "convit_tiny": (_timm("convit_tiny", img_size=32, depth=2, local_up_to_layer=1), 32),
    "open_clip_RN50_attnpool": (_attention_pool, 64),
    # attention with logit biases, Linear+BatchNorm1d, Hardswish (the elementwise rule)
    "levit_128s": (_timm("levit_128s", img_size=64, embed_dim=(32, 48, 64), depth=(1, 1, 1),
                         num_heads=(2, 3, 4), key_dim=8), 64),
}


def _score(out: torch.Tensor) -> torch.Tensor:
    return out.flatten()[3]


@pytest.mark.parametrize("name", list(REAL))
def test_real_model(name):
    make, size = REAL[name]
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        torch.manual_seed(0)
        model = perturb(make().to(dtype))
        x = torch.randn(1, 3, size, size, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm's and open_clip's own
            gm = libra_transform(model, example_inputs=(x,))
        assert gm.libra_report.complete, gm.libra_report.violations
        assert torch.equal(model(x), gm(x))  # as autograd records it (kernels may differ)
        with torch.no_grad():
            assert torch.equal(model(x), gm(x))
        assert completeness_error(gm, x, _score).relative.item() < tol, dtype

