"""Maps on every residual stream: spatial grids (B, H, W, C) and (B, C, H, W), hierarchical
models whose grid coarsens from stage to stage, and sequences with no grid.

References are the tests' own: the first block's input and its gradient are read with a
forward hook on the user's model (path written here by hand, not found by the code under
test), x·∂f/∂x from autograd on the compiled module (``libra_transform``'s output), and
completeness against the score. Tiny random configs: 32x32 images, one or two blocks per stage.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.models.maxxvit import MaxxVit, model_cfgs
from torch import nn

from libragrad_fx import METHODS, Explainer, LibraError
from tests.harness import perturb

warnings.filterwarnings("ignore", message="No pretrained weights")
TARGET = 3


def _maxvit(variant: str) -> nn.Module:
    cfg = model_cfgs[variant]
    cfg = dataclasses.replace(
        cfg, embed_dim=(16, 32), depths=(1, 1), block_type=cfg.block_type[:2], stem_width=8,
        transformer_cfg=dataclasses.replace(cfg.transformer_cfg, dim_head=8, partition_ratio=8))
    return MaxxVit(cfg, img_size=32, num_classes=5)


# name: (builder, first block's path, channels last, blocks found, block count)
MODELS = {
    "timm_swin": (lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16,
        depths=(1, 2), num_heads=(1, 2), num_classes=5),
        "layers.0.blocks.0", True, "layers.*.blocks", 3),
    "timm_convnext": (lambda: timm.create_model(
        "convnext_atto", dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), num_classes=5),
        "stages.0.blocks.0", False, "stages.*.blocks", 5),
    "timm_maxvit": (lambda: _maxvit("maxvit_rmlp_pico_rw"), "stages.0", False, "stages", 2),
    "torchvision_swin": (lambda: torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 2], num_heads=[1, 2], window_size=[4, 4],
        num_classes=5), "features.1.0", True, "features.*", 3),
}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    build, first, last, name, count = MODELS[request.param]
    torch.manual_seed(0)
    model = perturb(build().eval())
    x = torch.randn(2, 3, 32, 32)
    return model, Explainer(model), x, first, last, name, count


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() / b.abs()


def _first_block(model: nn.Module, path: str, x: torch.Tensor):
    """h_0 and ∂f/∂h_0 of the user's model, read with a hook on the block at ``path``."""
    seen = {}

    def hook(module, args):
        args[0].retain_grad()
        seen["h"] = args[0]

    handle = model.get_submodule(path).register_forward_pre_hook(hook)
    try:
        model(x)[:, TARGET].sum().backward()
    finally:
        handle.remove()
    return seen["h"].detach(), seen["h"].grad


def _input_x_gradient(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Σ_c x ⊙ ∂f/∂x under the compiled module's backward, (B, H, W), from autograd alone."""
    x = x.clone().requires_grad_(True)
    gm(x)[:, TARGET].sum().backward()
    return (x * x.grad).sum(1).detach()


@pytest.mark.parametrize("level", ["token", "pixel"])
def test_fullgrad_plus_is_complete_on_every_grid(case, level):
    model, explainer, x, *_ = case
    libra = explainer.explain(x, target=TARGET, method="fullgrad+", level=level)
    vanilla = explainer.explain(x, target=TARGET, method="fullgrad+", level=level, libra=False)
    assert libra.token_map.shape == (2, libra.patch_map[0].numel())
    assert libra.patch_map.dim() == 3 and libra.prefix == 0
    assert _relative(libra.total, libra.score).max() < 1e-4
    assert _relative(vanilla.total, vanilla.score).max() > 1e-3
    if level == "pixel":
        assert libra.pixel_map.shape == (2, 32, 32)
        torch.testing.assert_close(libra.pixel_map.sum((1, 2)), libra.token_map.sum(-1))


def test_input_x_gradient_is_the_first_block_input_times_its_gradient(case):
    """Token level: the map is Σ_c h_0 ⊙ g_0 cell by cell, on h_0's own grid (vanilla, hooks);
    pixel level: Σ_c x ⊙ ∂f/∂x under LibraGrad (autograd on the compiled module)."""
    model, explainer, x, first, channels_last, _, _ = case
    h, g = _first_block(model, first, x)
    cells = (h * g).sum(-1 if channels_last else 1)
    e = explainer.explain(x, target=TARGET, method="input_x_gradient", libra=False)
    torch.testing.assert_close(e.patch_map, cells, rtol=1e-4, atol=1e-6)
    pixel = explainer.explain(x, target=TARGET, method="input_x_gradient", level="pixel")
    reference = _input_x_gradient(explainer.compiled(True, x).gm, x)
    torch.testing.assert_close(pixel.pixel_map, reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pixel.total, reference.sum((1, 2)), rtol=1e-4, atol=1e-6)


def test_blocks_are_found_stage_after_stage(case):
    model, explainer, x, first, _, name, count = case
    found = explainer.compiled(True, x).structure
    assert found.name == name and len(found.paths) == count and found.paths[0] == first


def test_a_cam_on_a_coarser_stage_is_spread_over_the_first_grid(case):
    """HiResCAM reads the last block, on the last stage's grid: each of its cells is shared
    evenly by the first grid's cells it covers, so the map's total is the block's Σ h ⊙ g."""
    model, explainer, x, *_ = case
    last = explainer.compiled(False, x).structure.paths[-1]
    h, g = _first_block(model, last, x)
    e = explainer.explain(x, target=TARGET, method="hirescam", libra=False)
    torch.testing.assert_close(e.total, (h * g).sum(tuple(range(1, h.dim()))),
                               rtol=1e-4, atol=1e-6)
    side = e.patch_map.shape[-1] // min(h.shape[1:])  # first-grid cells per last-grid cell
    if side > 1:
        blocks = e.patch_map.unfold(1, side, side).unfold(2, side, side)
        torch.testing.assert_close(blocks, blocks[..., :1, :1].expand_as(blocks))


ATTENTION = {"attention", "rollout", "genatt", "gradsam", "attcat", "tokentm"}


def test_every_other_method_works_or_says_why(case):
    """Gradient and CAM methods work on every grid; attention methods need one global attention
    per block over the map's tokens, which windowed (Swin), two-per-block (MaxViT) or no
    attention (ConvNeXt) does not give: they refuse in one line."""
    model, explainer, x, *_ = case
    for method in METHODS:
        options = {"integrated_gradients": {"steps": 4},
                   "smoothgrad": {"samples": 2}}.get(method, {})
        try:
            e = explainer.explain(x, target=TARGET, method=method, **options)
        except LibraError as exc:
            assert method in ATTENTION, f"{method}: {exc}"
            assert "\n" not in str(exc) and "attention" in str(exc)
        else:
            assert e.token_map.shape == (2, e.patch_map[0].numel())
            assert torch.isfinite(e.token_map).all()


def test_token_removal_on_a_grid_says_to_mask_pixels():
    from libragrad_fx.metrics import token_removal

    torch.manual_seed(0)
    model = perturb(MODELS["timm_convnext"][0]().eval())
    x = torch.randn(2, 3, 32, 32)
    e = Explainer.cached(model).explain(x, target=TARGET)
    with pytest.raises(LibraError, match="mode='pixel'"):
        token_removal(model, x, e, TARGET, mode="zero", fractions=(0.5,))
    curves = token_removal(model, x, e, TARGET, mode="pixel", fractions=(0.5,))
    assert curves is not None


def test_regrid_keeps_the_total_both_ways():
    from libragrad_fx.attribution.grid import regrid

    torch.manual_seed(0)
    coarse = torch.randn(2, 2, 3)
    fine = regrid(coarse, (4, 6))
    assert fine.shape == (2, 4, 6)
    torch.testing.assert_close(fine.sum((1, 2)), coarse.sum((1, 2)))
    torch.testing.assert_close(fine[:, :2, :2], coarse[:, :1, :1].expand(2, 2, 2) / 4)
    torch.testing.assert_close(regrid(fine, (2, 3)), coarse)
    with pytest.raises(LibraError, match="3x3 grid cannot be put on the 4x6"):
        regrid(torch.zeros(1, 3, 3), (4, 6))


def test_maxvit_with_a_tanh_head():
    """maxvit_tiny_tf's head has a tanh (certified by the elementwise rule): its maps are
    complete too, on the stem's 16x16 grid."""
    torch.manual_seed(0)
    model = perturb(_maxvit("maxvit_tiny_tf").eval())
    x = torch.randn(2, 3, 32, 32)
    explainer = Explainer(model)
    gm = explainer.compiled(True, x).gm
    assert gm.libra_report.complete
    for level in ("token", "pixel"):
        full = explainer.explain(x, target=TARGET, method="fullgrad+", level=level)
        assert full.token_map.shape == (2, 256)
        assert _relative(full.total, full.score).max() < 1e-4
    pixel = explainer.explain(x, target=TARGET, method="input_x_gradient", level="pixel")
    torch.testing.assert_close(pixel.pixel_map, _input_x_gradient(gm, x), rtol=1e-4, atol=1e-6)


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.n1(x)).chunk(3, -1)
        heads = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])
        x = x + self.proj(heads[:, 0])
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class _Text(nn.Module):
    """A text-like model: (B, T, C) float embeddings, position embeddings, repeated blocks,
    mean pooling; no grid anywhere."""

    def __init__(self, c: int = 16, tokens: int = 7, depth: int = 2):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(tokens, c) * 0.1)
        self.blocks = nn.ModuleList(_Block(c) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(c), nn.Linear(c, 5)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        x = e + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def test_a_sequence_gets_a_map_per_token():
    torch.manual_seed(0)
    model = perturb(_Text().eval())
    e = torch.randn(2, 7, 16)
    explainer = Explainer(model)
    libra = explainer.explain(e, target=TARGET, method="fullgrad+")
    vanilla = explainer.explain(e, target=TARGET, method="fullgrad+", libra=False)
    assert libra.token_map.shape == (2, 7) and libra.patch_map.shape == (2, 7)
    assert _relative(libra.total, libra.score).max() < 1e-4
    assert _relative(vanilla.total, vanilla.score).max() > 1e-3
    h, g = _first_block(model, "blocks.0", e)
    ixg = explainer.explain(e, target=TARGET, method="input_x_gradient", libra=False)
    torch.testing.assert_close(ixg.token_map, (h * g).sum(-1), rtol=1e-4, atol=1e-6)
    rollout = explainer.explain(e, target=TARGET, method="rollout", query="mean")
    assert rollout.token_map.shape == (2, 7)
    with pytest.raises(LibraError, match="no grid.*read token_map"):
        libra.heatmap(32)
    with pytest.raises(LibraError, match="level='pixel' needs an image"):
        explainer.explain(e, target=TARGET, method="fullgrad+", level="pixel")


class _Keyword(nn.Module):
    """A Hugging Face model called on one keyword input, its logits returned."""

    def __init__(self, model: nn.Module, keyword: str):
        super().__init__()
        self.model, self.keyword = model, keyword

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.keyword: x}).logits


def _hf(cls: str, config: str, keyword: str, **sizes) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config)(**sizes))
    return _Keyword(perturb(model.eval()), keyword).eval()


def test_hugging_face_bert_on_embeddings_and_swin_on_pixels():
    """BERT on inputs_embeds: a map per token; HF Swin keeps its stream flat, (B, h·w, C), on a
    grid that coarsens by stage: both complete under LibraGrad, token and pixel level."""
    bert = _hf("BertForSequenceClassification", "BertConfig", "inputs_embeds", hidden_size=16,
               num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               vocab_size=50, max_position_embeddings=16, num_labels=3)
    e = torch.randn(2, 6, 16)
    text = Explainer(bert).explain(e, target=1, method="fullgrad+")
    assert text.token_map.shape == (2, 6)
    assert _relative(text.total, text.score).max() < 1e-4
    swin = _hf("SwinForImageClassification", "SwinConfig", "pixel_values", image_size=32,
               patch_size=2, embed_dim=16, depths=[1, 2], num_heads=[2, 2], window_size=4,
               num_labels=10)
    x = torch.randn(2, 3, 32, 32)
    explainer = Explainer(swin)
    assert len(explainer.compiled(True, x).structure.paths) == 3
    for level in ("token", "pixel"):
        e = explainer.explain(x, target=TARGET, method="fullgrad+", level=level)
        assert e.patch_map.shape == (2, 16, 16)
        assert _relative(e.total, e.score).max() < 1e-4
    h, _ = _first_block(swin, "model.swin.encoder.layers.1.blocks.1", x)
    assert h.shape == (2, 64, 32)  # the last stage: 8x8 cells, flat, put on the 16x16 grid
