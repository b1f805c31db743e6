"""GradCAM and XGradCAM+ over every token (DESIGN.md) and over the patch tokens only
(pytorch-grad-cam's form, tokens='patches'), against a hook-based reference in plain PyTorch."""

from __future__ import annotations

import pytest
import timm
import torch

from libragrad_fx import InputError, explain
from tests.harness import perturb

pytestmark = pytest.mark.usefixtures("seeded")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2, num_classes=5)
    return perturb(model)


def _last_block_h_and_g(model, x, target):
    """h and df/dh at the last block's input, by a pre-hook on the original model."""
    seen = {}

    def keep(_module, args):
        args[0].retain_grad()
        seen["h"] = args[0]

    handle = model.blocks[-1].register_forward_pre_hook(keep)
    try:
        model(x)[:, target].sum().backward()
    finally:
        handle.remove()
    return seen["h"].detach(), seen["h"].grad.detach()


def _reference(h, g, method: str, prefix: int, tokens: str) -> torch.Tensor:
    if tokens == "patches":
        h, g = h[:, prefix:], g[:, prefix:]
    if method == "gradcam":
        cam = (g.mean(1, keepdim=True) * h).sum(-1)
    else:
        a = h.abs()
        cam = ((g * a).sum(1, keepdim=True) / a.sum(1, keepdim=True) * a).sum(-1)
    if tokens == "patches":
        cam = torch.cat([torch.zeros(cam.shape[0], prefix), cam], 1)
    return cam


@pytest.mark.parametrize("method", ["gradcam", "xgradcam+"])
@pytest.mark.parametrize("tokens", ["all", "patches"])
def test_cam_weights_over_all_or_patch_tokens_match_the_reference(vit, method, tokens):
    x = torch.randn(2, 3, 32, 32)
    h, g = _last_block_h_and_g(vit, x.clone().requires_grad_(True), 3)
    got = explain(vit, x, target=3, method=method, libra=False, tokens=tokens)
    expected = _reference(h, g, method, vit.num_prefix_tokens, tokens)
    torch.testing.assert_close(got.token_map, expected, rtol=1e-4, atol=1e-6)


def test_the_two_forms_differ_where_the_class_token_gradient_dominates(vit):
    x = torch.randn(1, 3, 32, 32)
    every = explain(vit, x, target=3, method="gradcam", libra=False)
    patches = explain(vit, x, target=3, method="gradcam", libra=False, tokens="patches")
    assert not torch.allclose(every.patch_map, patches.patch_map)


def test_an_unknown_token_choice_is_refused(vit):
    with pytest.raises(InputError, match="tokens must be 'all' or 'patches'"):
        explain(vit, torch.randn(1, 3, 32, 32), target=0, method="gradcam", tokens="cls")
