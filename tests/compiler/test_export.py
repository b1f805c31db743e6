"""The torch.export frontend: same forward, same rewrites and gradients as the fx frontend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from libragrad_fx import LibraError, TraceError, libra_transform
from libragrad_fx.compiler.frontends.export import export_trace
from tests.harness import perturb
from tests.zoo import timm_model


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """Export and small forwards gain nothing from more threads; restore the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))
    yield
    torch.set_num_threads(before)


class ShapeBranch(nn.Module):
    """A small attention block that halves long sequences: `if` on a shape stops fx."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.act = nn.GELU()
        self.head = nn.Linear(dim, 3)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.reshape(b, t // 2, 2, d).mean(2)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 4:
            x = self.pool(x)
        return self.block(x)


class AlwaysPool(ShapeBranch):
    """The same network without the branch, which fx can trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.pool(x))


class ValueBranch(nn.Module):
    """Control flow on a tensor value: neither frontend can turn it into one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class OpZoo(nn.Module):
    """Many ATen ops the table translates, each checked for an identical forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)
        self.emb = nn.Embedding(10, 5, padding_idx=0)
        self.register_buffer("rows", torch.arange(2))
        self.scale = torch.tensor([1.5, 2.0])  # a plain tensor attribute: lifted as a constant

    def forward(self, x: torch.Tensor) -> tuple:
        y = F.max_pool2d(self.bn(self.conv(x)), 2)
        y = F.interpolate(y, size=(5, 5), mode="bilinear", align_corners=False) + F.interpolate(
            y, size=(5, 5), mode="nearest")
        y = F.normalize(F.hardswish(y), dim=1) + F.group_norm(y, 1) + F.pad(y, (1, 1))[..., 1:-1]
        z = y[:, 1:, ::2, -1].to(torch.float64).float()
        w = y[self.rows, :, 0] * self.scale[0] + self.emb(torch.tensor([[0, 3]]))[0, :1, :]
        f = y.flatten(2)
        q = (f @ f.transpose(-1, -2)).softmax(-1, dtype=torch.float32)
        r = torch.einsum("bcn,bdn->bcd", f, f) + torch.bmm(f, f.mT) + q
        v = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) + (2 - y) + y.var()
        g = F.silu(y) * torch.sigmoid(1.702 * y) + torch.tanh(y).exp()
        g = g + F.gelu(y, approximate="tanh")
        s = torch.split(y, [1, 2], dim=1)[1].sum() + y.chunk(3, dim=1)[2].sum()
        s = s + torch.stack([y]).sum()
        h = torch.where(y > 0, y, 0.5 * y) + F.layer_norm(y, (5,)) + F.adaptive_avg_pool2d(y, 1)
        return z.sum() + w.sum() + r.sum() + v.sum() + g.sum() + s + h.sum(), {"y": y, "z": [z]}


class InPlaceNoGrad(nn.Module):
    """An in-place activation and a ``torch.no_grad()`` block (a statistic used as a constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(4, 8), nn.Linear(8, 3), nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale = x.abs().amax()
        return self.fc2(self.act(self.fc1(x))) / scale


def snapshot(model: nn.Module) -> dict:
    return {
        "params": [(n, p, p.detach().clone(), p.requires_grad)
                   for n, p in model.named_parameters()],
        "buffers": [(n, b, b.clone()) for n, b in model.named_buffers()],
        "training": [m.training for m in model.modules()],
        "forward": model.__dict__.get("forward"),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert [(n, p) for n, p, *_ in after["params"]] == [(n, p) for n, p, *_ in before["params"]]
    for (_, p, _, grad_flag), (_, _, value, flag) in zip(after["params"], before["params"],
                                                         strict=True):
        assert torch.equal(p, value) and grad_flag == flag and p.grad is None
    for (_, b, _), (_, b0, value) in zip(after["buffers"], before["buffers"], strict=True):
        assert b is b0 and torch.equal(b, value)
    assert after["training"] == before["training"] and after["forward"] is before["forward"]


def input_grad(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    out = gm(x)
    (grad,) = torch.autograd.grad(out[:, 1].sum(), x)
    return grad


@pytest.fixture(scope="module")
def vit():
    # ViT-Tiny as it is (12 blocks, width 192), at 64x64 pixels to keep the test fast
    model = perturb(timm_model("vit_tiny_patch16_224", img_size=64))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    before = snapshot(model)
    gm = libra_transform(model, frontend="export", example_inputs=(x,))
    return model, x, gm, before


def test_vit_forward_is_bit_identical(vit):
    model, x, gm, _ = vit
    assert gm.libra_report.frontend == "export"
    assert torch.equal(gm(x), model(x))
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_vit_batch_dimension_stays_free(vit):
    model, x, gm, _ = vit
    for batch in (x[:1], torch.cat([x, x[:1]])):
        assert torch.equal(gm(batch), model(batch))


def test_vit_rewrites_match_the_fx_frontend(vit):
    model, _, gm, _ = vit
    fx_gm = libra_transform(model, frontend="fx")
    counts = gm.libra_report.counts
    assert counts == fx_gm.libra_report.counts
    assert (counts["attention"], counts["gate"], counts["norm"]) == (12, 12, 25)
    wheres = sorted(r.module for r in gm.libra_report.rewrites)
    assert wheres == sorted(r.module for r in fx_gm.libra_report.rewrites)
    assert "blocks.0.attn" in wheres


def test_vit_model_is_unchanged_and_shared(vit):
    model, x, gm, before = vit
    input_grad(gm, x)  # a gradient through the graph leaves no .grad on the model
    assert_unchanged(model, before)
    ours = dict(model.named_parameters())
    assert all(p is ours[name] for name, p in gm.named_parameters())


def test_vit_input_gradient_matches_the_fx_frontend_in_float64():
    model = perturb(timm_model("vit_tiny_patch16_224", img_size=32)).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exported = libra_transform(model, frontend="export", example_inputs=(x,))
    traced = libra_transform(model, frontend="fx")
    assert torch.equal(exported(x), model(x))
    torch.testing.assert_close(input_grad(exported, x), input_grad(traced, x), rtol=1e-5, atol=0)


@pytest.mark.parametrize("frontend", ["export", "auto"])
def test_shape_branch_model(frontend):
    torch.manual_seed(0)
    model = ShapeBranch().eval()
    x = torch.randn(2, 8, 16)
    with pytest.raises(TraceError):
        libra_transform(model, frontend="fx")
    before = snapshot(model)
    gm = libra_transform(model, frontend=frontend, example_inputs=(x,))
    assert gm.libra_report.frontend == "export"
    assert gm.libra_report.complete
    counts = gm.libra_report.counts
    assert (counts["attention"], counts["gate"], counts["norm"]) == (1, 1, 2)
    assert torch.equal(gm(x), model(x))
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert_unchanged(model, before)

    twin = AlwaysPool().eval()
    twin.load_state_dict(model.state_dict())
    twin = libra_transform(twin.double(), frontend="fx")
    assert twin.libra_report.counts == counts
    x64 = x.double()
    gm64 = libra_transform(model.double(), frontend=frontend, example_inputs=(x64,))
    torch.testing.assert_close(input_grad(gm64, x64), input_grad(twin, x64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("frontend", ["export", "auto"])
def test_model_neither_frontend_handles_raises_trace_error_with_the_reason(frontend):
    model = ValueBranch().eval()
    before = snapshot(model)
    with pytest.raises(TraceError, match=r"torch\.export.*(data-dependent|DataDependent)") as err:
        libra_transform(model, frontend=frontend, example_inputs=(torch.randn(2, 4),))
    assert "torch.where" in str(err.value) and "x.sum() > 0" in str(err.value)
    assert_unchanged(model, before)


def test_export_without_example_inputs_is_refused():
    with pytest.raises(LibraError, match="example_inputs"):
        libra_transform(ShapeBranch().eval(), frontend="export")


def test_non_tensor_example_inputs_are_refused():
    with pytest.raises(TraceError, match="tensors"):
        libra_transform(ShapeBranch().eval(), frontend="export", example_inputs=(3,))


def test_every_translated_op_keeps_the_forward_bit_identical():
    torch.manual_seed(0)
    model = OpZoo().eval()
    x = torch.randn(2, 3, 12, 12)
    gm = export_trace(model, (x,))
    left = [n.target for n in gm.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]
    assert left == []
    (ref, ref_rest), (out, out_rest) = model(x), gm(x)
    assert torch.equal(out, ref)
    assert torch.equal(out_rest["y"], ref_rest["y"])
    assert torch.equal(out_rest["z"][0], ref_rest["z"][0])


def test_in_place_activation_and_no_grad_block_are_visible_to_the_rules():
    torch.manual_seed(0)
    model = InPlaceNoGrad().eval()
    x = torch.randn(2, 4)
    gm = libra_transform(model, frontend="export", example_inputs=(x,))
    assert gm.libra_report.counts["gate"] == 1 and gm.libra_report.complete
    assert torch.equal(gm(x), model(x))
