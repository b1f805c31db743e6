"""The fused-attention ops of the attention rule: the forward is the fused kernel's bit for bit,
the backward equals a reference written out here (softmax by hand, V the only path), and the
projection that feeds q, k and v drops the rows that carry no gradient, exactly."""

import math

import pytest
import torch
import torch.nn.functional as F

from libragrad_fx import LibraWarning, libra, libra_transform
from libragrad_fx.attribution.probe import Probe
from libragrad_fx.runtime import sdpa


def _randn(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _reference_dv(q, k, v, dout, mask=None, causal=False, scale=None):
    """dV = Aᵀ·dO with A = softmax(q kᵀ·scale + mask), written out without the library."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = torch.einsum("...le,...se->...ls", q, k) * scale
    if causal:
        keep = torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
        logits = torch.where(keep, logits, torch.tensor(-math.inf, dtype=logits.dtype))
    if mask is not None:
        logits = (torch.where(mask, logits, torch.tensor(-math.inf, dtype=logits.dtype))
                  if mask.dtype == torch.bool else logits + mask)
    probs = torch.exp(logits - logits.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.einsum("...ls,...le->...se", probs, dout)


CASES = {
    "plain": {},
    "scale": {"scale": 0.3},
    "causal": {"is_causal": True},
    "additive mask": {"attn_mask": _randn(5, 7, seed=3)},
    "boolean mask": {"attn_mask": _randn(5, 7, seed=4) > -0.5},
}


@pytest.mark.parametrize("case", CASES)
def test_fused_attention_keeps_the_forward_and_passes_gradient_to_v_only(case):
    kwargs = CASES[case]
    length = 7 if kwargs.get("is_causal") else 5
    q, k, v = _randn(2, 3, length, 4, seed=0), _randn(2, 3, 7, 4, seed=1), _randn(2, 3, 7, 6,
                                                                                  seed=2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = sdpa.libra_scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, **kwargs))
    dout = _randn(*out.shape, seed=5)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout, allow_unused=True)
    assert dq is None and dk is None
    want = _reference_dv(q.detach(), k.detach(), v.detach(), dout,
                         kwargs.get("attn_mask"), kwargs.get("is_causal", False),
                         kwargs.get("scale"))
    torch.testing.assert_close(dv, want)
    # the unmodified op passes gradient to q as well: the cut is what this op adds
    (dq_vanilla,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, **kwargs), q,
                                        dout)
    assert dq_vanilla.abs().max() > 1e-3


def test_grouped_query_attention_sums_v_gradient_over_each_group():
    q = _randn(2, 4, 5, 3, seed=0).requires_grad_()
    k, v = _randn(2, 2, 5, 3, seed=1), _randn(2, 2, 5, 3, seed=2).requires_grad_()
    out = sdpa.libra_scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    dout = _randn(*out.shape, seed=3)
    (dv,) = torch.autograd.grad(out, v, dout)
    per_head = _reference_dv(q.detach(), k.repeat_interleave(2, 1), None, dout)
    torch.testing.assert_close(dv, per_head.reshape(2, 2, 2, 5, 3).sum(2))


def test_dropout_falls_back_to_the_fused_op_on_detached_q_and_k():
    q, k, v = (_randn(1, 2, 4, 3, seed=s).requires_grad_() for s in range(3))
    torch.manual_seed(0)
    out = sdpa.libra_scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
    dq, dv = torch.autograd.grad(out.sum(), (q, v), allow_unused=True)
    assert dq is None and dv is not None


@pytest.mark.parametrize("cut", ["one run", "scattered", "none"])
def test_cut_linear_leaves_out_zero_gradient_rows_exactly(cut):
    x, w, b = (_randn(*s, seed=i).requires_grad_() for i, s in
               enumerate([(2, 5, 4), (9, 4), (9,)]))
    out = sdpa.cut_linear(x, w, b)
    assert torch.equal(out, F.linear(x, w, b))
    dout = _randn(2, 5, 9, seed=7)
    if cut == "one run":
        dout[..., :6] = 0  # the q and k thirds of a fused projection
    elif cut == "scattered":
        dout[..., ::2] = 0
    dx, dw, db = torch.autograd.grad(out, (x, w, b), dout)
    torch.testing.assert_close(dx, torch.einsum("bto,oi->bti", dout, w.detach()))
    torch.testing.assert_close(dw, torch.einsum("bto,bti->oi", dout, x.detach()))
    torch.testing.assert_close(db, dout.sum((0, 1)))
    (dx_only,) = torch.autograd.grad(sdpa.cut_linear(x, w.detach(), b.detach()), x, dout)
    torch.testing.assert_close(dx_only, dx)


class _FusedBlock(torch.nn.Module):
    """A pre-norm attention block with one qkv projection and fused attention (as timm's)."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads, self.norm = heads, torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(1, 2).reshape(b, t, c))


def test_the_attention_rule_cuts_the_fused_projection_and_keeps_the_model_gradient():
    torch.manual_seed(0)
    model = _FusedBlock().double().eval()
    with pytest.warns(LibraWarning):  # the layer norm is left vanilla here, so not complete
        gm = libra_transform(model, rules=libra(gate=False, norm=False, self_gating=False))
    (rewrite,) = [r for r in gm.libra_report.rewrites if r.rule == "attention"]
    assert rewrite.action.endswith("skips q, k rows")
    assert any(n.target is sdpa.cut_linear for n in gm.graph.nodes)
    x = _randn(2, 6, 8).requires_grad_()
    out = gm(x)
    assert torch.equal(out, model(x))
    # the same rewrite without the cut projection: q and k detached, v the only path
    reference = torch.fx.symbolic_trace(model)
    for node in reference.graph.nodes:
        if node.target is F.scaled_dot_product_attention:
            with reference.graph.inserting_before(node):
                q, k = (reference.graph.call_function(torch.detach, (a,)) for a in node.args[:2])
            node.args = (q, k, *node.args[2:])
    reference.recompile()
    dout = _randn(*out.shape, seed=9)
    (got,) = torch.autograd.grad(out, x, dout)
    (want,) = torch.autograd.grad(reference(x), x, dout)
    torch.testing.assert_close(got, want)


def test_explanations_hand_custom_backwards_their_parameters_detached():
    model = _FusedBlock().eval()
    gm = libra_transform(model)
    probe = Probe(gm, ())
    users = {user.target for node in probe.module.graph.nodes if node.op == "get_attr"
             for user in node.users}
    assert sdpa.cut_linear not in users  # reads its weight and bias through detach
    assert F.linear in users  # native ops keep the parameters themselves
    x = torch.randn(2, 6, 8, requires_grad=True)
    output, _ = probe(x)
    output.sum().backward()
    assert model.qkv.weight.grad is None and model.norm.weight.grad is None
    assert model.proj.weight.grad is not None
