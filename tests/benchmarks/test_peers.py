"""The peers' maps (benchmarks.peers): lxt's patches are on only inside their context, LXT's
CP-LRP computes what Libra input × gradient computes, Captum's IG is complete, LeGrad leaves
the model as it was, and a model a peer cannot run gets a reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import faithfulness, peers
from libragrad_fx import explain
from libragrad_fx.digits import data

pytestmark = pytest.mark.bench  # see [tool.pytest.ini_options] markers


@pytest.fixture(scope="module")
def digits():
    return data.make_digits("test", 3, seed=4)


@pytest.fixture(scope="module")
def vit():
    return faithfulness._model("vit")


def test_lxt_patches_are_undone(vit, digits):
    norm = type(vit.norm)  # timm's own LayerNorm class
    before = (nn.GELU.__dict__["forward"], norm.__dict__["forward"],
              F.scaled_dot_product_attention)
    reference = vit(digits.images)
    with peers.lxt_patched("cp", {type(m) for m in vit.modules()}):
        assert norm.__dict__["forward"] is not before[1]
        assert F.scaled_dot_product_attention is not before[2]
        assert torch.allclose(vit(digits.images), reference, atol=1e-5)  # forward kept
    after = (nn.GELU.__dict__["forward"], norm.__dict__["forward"],
             F.scaled_dot_product_attention)
    assert after == before and "original_forward" not in nn.GELU.__dict__


def test_lxt_cp_lrp_is_libra_input_x_gradient(vit, digits):
    """CP-LRP (no gradient through q, k; identity rules on GELU and LayerNorm's std) is the
    same backward as LibraGrad's attention, gate and norm rules: two implementations agree."""
    found = peers.peer_map("LXT CP-LRP", vit, digits.images, digits.labels)
    ours = explain(vit, digits.images, target=digits.labels, method="input_x_gradient",
                   level="pixel").pixel_map
    ours = F.avg_pool2d(ours[:, None], 6)[:, 0] * 36
    vanilla = explain(vit, digits.images, target=digits.labels, method="input_x_gradient",
                      libra=False, level="pixel").pixel_map
    vanilla = F.avg_pool2d(vanilla[:, None], 6)[:, 0] * 36
    scale = ours.abs().max()
    assert (found.patch_map - ours).abs().max() < 1e-4 * scale
    assert (found.patch_map - vanilla).abs().max() > 1e-2 * scale
    assert found.seconds_per_image > 0


def test_captum_ig_is_complete(vit, digits):
    found = peers.peer_map("Captum IG", vit, digits.images, digits.labels)
    with torch.no_grad():
        gain = (vit(digits.images) - vit(torch.zeros_like(digits.images))).gather(
            1, digits.labels[:, None])[:, 0]
    total = found.patch_map.flatten(1).sum(1)
    assert torch.allclose(total, gain, rtol=0.05, atol=0.05 * gain.abs().max())


def test_legrad_on_clip_leaves_the_model_alone(digits):
    clip = faithfulness._model("clip")
    reference = clip(digits.images)
    grads = [p.requires_grad for p in clip.parameters()]
    found = peers.peer_map("LeGrad", clip, digits.images, digits.labels)
    assert found.patch_map.shape == (3, 8, 8) and torch.isfinite(found.patch_map).all()
    assert found.patch_map.flatten(1).std(1).min() > 0  # a map, not a constant
    assert torch.equal(clip(digits.images), reference)
    assert [p.requires_grad for p in clip.parameters()] == grads


def test_a_model_a_peer_cannot_run_gets_a_reason(vit, digits):
    eva = faithfulness._model("eva")
    found = peers.peer_map("LXT AttnLRP", eva, digits.images, digits.labels)
    assert found.patch_map is None and "GluMlp" in found.reason
    found = peers.peer_map("LeGrad", vit, digits.images, digits.labels)
    assert found.patch_map is None and "open_clip" in found.reason
