"""torchvision backbones by the default frontend, and the fx-wrapped leaves and eval identities
they rely on.

Each backbone is built from a small config with torchvision's own classes, weights perturbed,
eval mode, and compiled as a user would: ``libra_transform(model, example_inputs=(x,))``. It
must give the same forward (``torch.equal``), be certified complete, and measure
``completeness_error`` < 1e-4 in float32 and < 1e-10 in float64, while the unmodified model
fails (> 1e-3). torchvision's Swin keeps ``shifted_window_attention`` an fx-wrapped leaf that
symbolic tracing cannot step into (an ``if`` on a padded shape), so ``auto`` takes the export
frontend for it; the others trace by fx, stepping into ``stochastic_depth`` (eval: its input).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx as fx
import torch.fx._symbolic_trace as fx_trace
import torch.nn.functional as F
from torch import nn

from libragrad_fx import LibraWarning, completeness_error, libra_transform

tv = pytest.importorskip("torchvision")
from torchvision.models import (  # noqa: E402
    ConvNeXt,
    EfficientNet,
    MaxVit,
    SwinTransformer,
    VisionTransformer,
)
from torchvision.models.convnext import CNBlockConfig  # noqa: E402
from torchvision.models.efficientnet import MBConvConfig  # noqa: E402
from torchvision.models.swin_transformer import (  # noqa: E402
    PatchMergingV2,
    SwinTransformerBlockV2,
)
from torchvision.ops import stochastic_depth  # noqa: E402

from tests.harness import perturb  # noqa: E402

pytestmark = pytest.mark.usefixtures("seeded")

BACKBONES = {
    "vit": lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                     hidden_dim=32, mlp_dim=64, num_classes=10),
    "swin": lambda: SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2],
                                    num_heads=[2, 2], window_size=[4, 4], num_classes=10),
    "maxvit": lambda: MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2,
                             block_channels=[8, 16], block_layers=[1, 1], head_dim=4,
                             stochastic_depth_prob=0.2, num_classes=10),
    "convnext": lambda: ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)],
                                 stochastic_depth_prob=0.1, num_classes=10),
    "efficientnet": lambda: EfficientNet([MBConvConfig(1, 3, 1, 8, 8, 1),
                                          MBConvConfig(4, 3, 2, 8, 16, 1)],
                                         dropout=0.2, stochastic_depth_prob=0.2,
                                         num_classes=10),
}
FRONTEND = {"swin": "export"}  # the rest: fx
BOUND = {torch.float32: 1e-4, torch.float64: 1e-10}
TARGET = 3


def _compile(model: nn.Module, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LibraWarning)
        return libra_transform(model, example_inputs=(x,))


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_by_the_default_frontend(name: str) -> None:
    base = perturb(BACKBONES[name]())
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(base).to(dtype)
        x = torch.randn(1, 3, 32, 32, dtype=dtype)  # one sample: one static export
        gm = _compile(model, x)
        report = gm.libra_report
        assert report.frontend == FRONTEND.get(name, "fx")
        assert torch.equal(gm(x), model(x))
        assert report.complete, report.violations
        assert completeness_error(gm, x, TARGET).relative.item() < BOUND[dtype]
        if dtype is torch.float64:
            assert completeness_error(model, x, TARGET).relative.item() > 1e-3


def test_swin_v2_by_the_default_frontend() -> None:
    """Swin V2 (cosine attention, post-norm, its own patch merging), float64 only (time)."""
    model = perturb(SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
        num_classes=10, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)).double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    gm = _compile(model, x)
    assert gm.libra_report.frontend == "export" and gm.libra_report.complete
    assert torch.equal(gm(x), model(x))
    assert completeness_error(gm, x, TARGET).relative.item() < BOUND[torch.float64]


# --- the pieces, on toy modules ----------------------------------------------------------------


def padded_half(x: torch.Tensor) -> torch.Tensor:
    """Traceable: fx keeps it a leaf only because it is registered with torch.fx.wrap."""
    return F.pad(x, (0, x.shape[-1] % 2)) * 0.5


def shape_branch(x: torch.Tensor) -> torch.Tensor:
    """Not traceable symbolically: an ``if`` on a shape (like shifted_window_attention)."""
    if x.shape[-1] >= 4:
        return x * 2.0
    return x


fx.wrap("padded_half")
fx.wrap("shape_branch")


class Wrapped(nn.Module):
    def __init__(self, fn, dim: int = 5) -> None:
        super().__init__()
        self.fn, self.fc1, self.fc2 = fn, nn.Linear(dim, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = padded_half(self.fc1(x)) if self.fn == "padded_half" else shape_branch(self.fc1(x))
        return self.fc2(torch.relu(h))


def _calls(gm: fx.GraphModule, fn) -> int:
    return sum(n.op == "call_function" and n.target is fn for n in gm.graph.nodes)


def test_wrapped_function_is_traced_into_without_changing_torch() -> None:
    registry = dict(fx_trace._wrapped_fns_to_patch)
    model = Wrapped("padded_half").eval()
    x = torch.randn(2, 5)
    gm = libra_transform(model, strict=True)
    assert gm.libra_report.frontend == "fx" and _calls(gm, padded_half) == 0
    assert any(n.target is F.pad for n in gm.graph.nodes)
    assert torch.equal(gm(x), model(x))
    # torch's registry and the module's globals are as they were: plain fx keeps the leaf
    assert dict(fx_trace._wrapped_fns_to_patch) == registry
    assert globals()["padded_half"].__code__ is padded_half.__code__
    assert _calls(fx.symbolic_trace(model), padded_half) == 1


def test_untraceable_wrapped_function_falls_back_to_export() -> None:
    model = Wrapped("shape_branch").eval()
    x = torch.randn(2, 5)
    with pytest.warns(LibraWarning, match="shape_branch"):
        alone = libra_transform(model)  # no example input: fx, the opaque call reported
    assert alone.libra_report.frontend == "fx" and _calls(alone, shape_branch) == 1
    gm = libra_transform(model, strict=True, example_inputs=(x,))
    assert gm.libra_report.frontend == "export" and _calls(gm, shape_branch) == 0
    assert torch.equal(gm(x), model(x)) and torch.equal(alone(x), model(x))


class EvalIdentities(nn.Module):
    """stochastic_depth and functional dropout in eval, out of place and in place; swapaxes
    and swapdims as functions and methods; an in-place nn.Dropout (export: aten.dropout_)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)
        self.drop = nn.Dropout(0.3, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (B, T, 6)
        h = stochastic_depth(h, 0.3, "row", training=self.training)
        h = F.dropout(h, 0.2, training=self.training)
        h = F.dropout(h.flatten(1).view(h.shape), 0.2, self.training, True)
        h = torch.swapaxes(h, 1, 2).swapaxes(1, 2)
        h = torch.swapdims(h, 0, 1).swapdims(0, 1)
        return self.fc2(self.drop(h.flatten(1).view(h.shape))).sum(1)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_eval_identities_and_swapaxes(frontend: str) -> None:
    model = EvalIdentities().eval()
    x = torch.randn(2, 4, 6)
    gm = libra_transform(model, strict=True, example_inputs=(x,), frontend=frontend)
    names = " ".join(str(n.target) for n in gm.graph.nodes)
    assert "dropout" not in names and "stochastic_depth" not in names
    assert "swap" in names  # kept: a reshape, not a violation
    assert torch.equal(gm(x), model(x))
    # the bias sites are the two linear biases, nothing else
    assert {s.source for s in gm.libra_report.bias_sites} == {("fc1.bias",), ("fc2.bias",)}
    x64 = x[:1].double()
    gm64 = libra_transform(model.double(), strict=True, example_inputs=(x64,),
                           frontend=frontend)
    assert completeness_error(gm64, x64, 0).relative.item() < 1e-10


def test_dropout_in_training_is_not_an_identity() -> None:
    """F.dropout(x, training=True) (its default) is kept: it is not an eval no-op."""

    class Forced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.dropout(x, 0.5))

    gm = libra_transform(Forced().eval())
    assert any(n.target is F.dropout for n in gm.graph.nodes)
