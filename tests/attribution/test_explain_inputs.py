"""explain takes a compiled module as the compiled model itself, and refuses bad inputs and
targets with one-line errors instead of torch's."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch

from libragrad_fx import InputError, LibraError, explain, libra_transform
from tests.harness import perturb

pytestmark = pytest.mark.usefixtures("seeded")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return perturb(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                     depth=2, embed_dim=32, num_heads=2, num_classes=5))


def test_a_compiled_module_is_explained_as_it_is_even_after_pickling(vit):
    x = torch.randn(2, 3, 32, 32)
    gm = libra_transform(vit)
    expected = explain(vit, x, target=3, method="fullgrad+")
    for compiled in (gm, pickle.loads(pickle.dumps(gm))):
        got = explain(compiled, x, target=3, method="fullgrad+")
        torch.testing.assert_close(got.token_map, expected.token_map)
        torch.testing.assert_close(got.total, got.score, rtol=1e-4, atol=1e-6)
    with pytest.raises(LibraError, match="compiled with LibraGrad's rules .* libra=False"):
        explain(gm, x, target=3, libra=False)
    vanilla = libra_transform(vit, rules=())
    torch.testing.assert_close(explain(vanilla, x, target=3, libra=False).token_map,
                               explain(vit, x, target=3, libra=False).token_map)


def _inference():
    with torch.inference_mode():
        return torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("x, says", [
    (torch.randn(1, 3, 40, 40), r"could not run VisionTransformer on a tensor of shape "
                                r"\(1, 3, 40, 40\).*the size it was built for"),
    (torch.randn(1, 4, 32, 32), r"shape \(1, 4, 32, 32\)"),
    (torch.randn(3, 32, 32), r"shape \(3, 32, 32\)"),
    (torch.randn(1, 3, 32, 32, dtype=torch.float64), "the input is torch.float64 but the "
                                                     "model is torch.float32"),
    (torch.randn(0, 3, 32, 32), "an empty batch"),
    (torch.empty(1, 3, 32, 32, device="meta"), "a meta tensor"),
])
def test_a_bad_input_is_one_line(vit, x, says):
    with pytest.raises(InputError, match=says) as info:
        explain(vit, x, target=1)
    assert "Proxy(" not in str(info.value)


def test_an_inference_mode_input_is_refused_with_the_way_out(vit):
    with pytest.raises(InputError, match=r"inference_mode\(\)"):
        explain(vit, _inference(), target=1)


@pytest.mark.parametrize("target, says", [
    ("cat", "a text target needs a model with a text tower"),
    (torch.tensor([1, 2, 3]), "3 targets for a batch of 2 samples"),
])
def test_a_bad_target_is_one_line(vit, target, says):
    with pytest.raises(InputError, match=says):
        explain(vit, torch.randn(2, 3, 32, 32), target=target)


def test_a_bare_tensor_as_example_inputs_is_refused(vit):
    with pytest.raises(LibraError, match=r"pass \(x,\), not x"):
        libra_transform(vit, example_inputs=torch.randn(2, 3, 32, 32))
