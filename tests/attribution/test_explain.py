"""explain(): completeness of the FullGrad maps, integrated gradients, CLIP prompts, errors.

The FullGrad checks are independent of the bias-map code: completeness is measured against
the score, and the pixel-level bias maps are compared with ``completeness_error``, which takes
b·∂f/∂b by substituting leaves for the bias arguments instead of reading op outputs.
"""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import open_clip
import pytest
import timm
import torch

from libragrad_fx import (
    METHODS,
    Explainer,
    InputError,
    LibraError,
    TrainingModeError,
    completeness_error,
    explain,
    libra_transform,
)
from tests.harness import perturb

warnings.filterwarnings("ignore", message="No pretrained weights")


def _vit():
    return perturb(timm.create_model("vit_tiny_patch16_224").eval())


def _mixer():
    return perturb(timm.create_model("mixer_s16_224").eval())


def _clip_tower():
    return perturb(open_clip.create_model("ViT-B-32", pretrained=None).visual.eval())


BUILDERS = {"vit_tiny": _vit, "mixer": _mixer, "clip_tower": _clip_tower}


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request):
    torch.manual_seed(1)
    return request.param, BUILDERS[request.param](), torch.randn(2, 3, 224, 224)


@pytest.fixture(scope="module")
def vit():
    """A small ViT (4 blocks, 64x64 images, 17 tokens) for what any ViT shows."""
    torch.manual_seed(2)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4)
    return perturb(model.eval()), torch.randn(2, 3, 64, 64)


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() / b.abs()


@pytest.mark.parametrize("method", ["fullgrad", "fullgrad+"])
def test_libra_fullgrad_is_complete_and_vanilla_is_not(case, method):
    _, model, x = case
    libra = explain(model, x, target=5, method=method)
    vanilla = explain(model, x, target=5, method=method, libra=False)
    assert torch.equal(libra.score, vanilla.score)
    assert _relative(libra.total, libra.score).max() < 1e-4
    assert _relative(vanilla.total, vanilla.score).max() > 1e-2


@pytest.mark.parametrize("libra", [False, True])
def test_pixel_fullgrad_equals_the_completeness_terms(case, libra):
    """x·∂f/∂x + Σ_s BiasMap_s over the pixels = input_term + bias_term, in both forms."""
    _, model, x = case
    x = x[:1]
    e = explain(model, x, target=5, method="fullgrad", libra=libra, level="pixel")
    subject = libra_transform(model) if libra else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        terms = completeness_error(subject, x, target=5)
    expected = terms.input_term + terms.bias_term
    assert e.pixel_map.shape == (1, 224, 224)
    torch.testing.assert_close(e.total, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(e.token_map.sum(-1) + e.remainder, e.pixel_map.sum((1, 2))
                               + e.remainder, rtol=1e-5, atol=1e-6)


def test_pixel_fullgrad_plus_is_complete(vit):
    model, x = vit
    e = explain(model, x, target=1, method="fullgrad+", level="pixel")
    assert _relative(e.total, e.score).max() < 1e-4
    assert e.pixel_map.shape == (2, 64, 64) and e.heatmap(224).shape == (2, 224, 224)


def test_integrated_gradients_sums_to_the_score_difference(case):
    _, model, x = case
    e = explain(model, x, target=5, method="integrated_gradients", libra=False, steps=64,
                internal_batch_size=32)
    assert _relative(e.total, e.score - e.baseline_score).max() < 0.05


def test_integrated_gradients_does_not_depend_on_the_chunking(vit):
    model, x = vit
    options = dict(target=3, method="integrated_gradients", steps=6, libra=False)
    small = explain(model, x, internal_batch_size=5, **options)
    large = explain(model, x, internal_batch_size=64, **options)
    torch.testing.assert_close(small.token_map, large.token_map, rtol=1e-4, atol=1e-6)
    pixel = explain(model, x, level="pixel", internal_batch_size=7, **options)
    # the patch embedding is affine: the pixel path is the token path
    torch.testing.assert_close(pixel.total, small.total, rtol=1e-3, atol=1e-5)


def test_a_batch_is_explained_as_its_samples(vit):
    model, x = vit
    together = explain(model, x, target=torch.tensor([3, 7]), method="fullgrad+")
    for i, t in enumerate((3, 7)):
        alone = explain(model, x[i:i + 1], target=t, method="fullgrad+")
        torch.testing.assert_close(together.token_map[i:i + 1], alone.token_map,
                                   rtol=1e-4, atol=1e-6)


def test_every_method_runs_in_both_forms(vit):
    model, x = vit
    for method in METHODS:
        options = {"steps": 2} if method == "integrated_gradients" else {}
        options |= {"samples": 2} if method == "smoothgrad" else {}
        maps = [explain(model, x, target=3, method=method, libra=libra, **options)
                for libra in (False, True)]
        for e in maps:
            assert e.token_map.shape == (2, 17) and e.patch_map.shape == (2, 4, 4)
            assert torch.isfinite(e.token_map).all() and e.method == method
        if method not in ("attention", "rollout"):  # these read A only
            assert not torch.allclose(maps[0].token_map, maps[1].token_map), method


def test_smoothgrad_without_noise_is_its_base_method(vit):
    model, x = vit
    base = explain(model, x, target=3, method="input_x_gradient")
    smooth = explain(model, x, target=3, method="smoothgrad", base="input_x_gradient",
                     samples=3, noise=0.0, internal_batch_size=4)
    torch.testing.assert_close(smooth.token_map, base.token_map, rtol=1e-5, atol=1e-7)


def test_probability_and_callable_targets(vit):
    model, x = vit
    with torch.no_grad():
        probs = model(x).softmax(-1)[:, 4]
    e = explain(model, x, target=4, method="gradient", score="probability")
    torch.testing.assert_close(e.score, probs)
    f = explain(model, x, target=lambda out: out[:, 4] - out[:, 5], method="fullgrad")
    assert _relative(f.total, f.score).max() < 1e-4


@pytest.fixture(scope="module")
def clip():
    model = perturb(open_clip.create_model("ViT-B-32", pretrained=None), seed=3)
    torch.manual_seed(4)
    return model, torch.randn(1, 3, 224, 224)


def test_one_image_two_prompts_give_two_maps(clip):
    model, image = clip
    prompts = ["a handwritten seven", "a handwritten three"]
    e = explain(model, image, target=prompts, method="fullgrad+")
    assert e.token_map.shape == (2, 50) and e.patch_map.shape == (2, 7, 7)
    assert not torch.allclose(e.token_map[0], e.token_map[1])
    with torch.no_grad():
        img = model.encode_image(image)
        txt = model.encode_text(open_clip.tokenize(prompts))
    expected = 100 * torch.nn.functional.cosine_similarity(img, txt)
    torch.testing.assert_close(e.score, expected, rtol=1e-5, atol=1e-5)
    assert _relative(e.total, e.score).max() < 1e-4  # the L2-normalisation rule is applied
    vanilla = explain(model, image, target=prompts, method="fullgrad+", libra=False)
    assert _relative(vanilla.total, vanilla.score).max() > 1e-2
    by_embedding = explain(model, image, target=txt[1], method="fullgrad+")
    torch.testing.assert_close(by_embedding.token_map[0], e.token_map[1], rtol=1e-4,
                               atol=1e-6)


def test_the_forms_are_compiled_once_and_released_with_the_model():
    model = perturb(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2).eval())
    x = torch.randn(1, 3, 64, 64)
    explain(model, x, target=0, method="gradient")
    forms = Explainer.cached(model).compiled_forms()
    first = next(iter(forms.values())).gm
    explain(model, x, target=1, method="fullgrad")
    assert next(iter(forms.values())).gm is first and len(forms) == 1
    ref = weakref.ref(model)
    del model, forms, first
    gc.collect()
    assert ref() is None


# --- bad input -------------------------------------------------------------------------------

def test_unknown_method_lists_the_known_ones(vit):
    model, x = vit
    with pytest.raises(InputError, match="unknown method 'gradcam\\+\\+'.*fullgrad\\+"):
        explain(model, x, target=0, method="gradcam++")


def test_target_out_of_range(vit):
    model, x = vit
    with pytest.raises(InputError, match="target class 1000 is out of range.*0 to 999"):
        explain(model, x, target=1000, method="gradient")
    with pytest.raises(InputError, match="3 targets for a batch of 2"):
        explain(model, x, target=[1, 2, 3], method="gradient")


def test_text_target_needs_a_text_tower(vit):
    model, x = vit
    with pytest.raises(InputError, match="text tower"):
        explain(model, x, target="a photo of a cat", method="fullgrad")


def test_class_token_method_without_a_class_token():
    model = perturb(timm.create_model("vit_tiny_patch16_224", class_token=False,
                                         global_pool="avg", img_size=64, depth=2))
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(InputError, match="no class token.*query='mean'"):
        explain(model, x, target=0, method="attention")
    e = explain(model, x, target=0, method="attention", query="mean")
    assert e.token_map.shape == (1, 16) and e.prefix == 0


def test_unknown_option_and_level(vit):
    model, x = vit
    with pytest.raises(InputError, match="takes no option stepz"):
        explain(model, x, target=0, method="integrated_gradients", stepz=3)
    with pytest.raises(InputError, match="hirescam has no pixel level"):
        explain(model, x, target=0, method="hirescam", level="pixel")


def test_a_model_in_training_mode_is_refused():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2).train()
    with pytest.raises(TrainingModeError, match="model.eval"):
        explain(model, torch.randn(1, 3, 64, 64), target=0, method="gradient")


def test_attention_method_on_a_model_without_attention():
    model = perturb(timm.create_model("mixer_s16_224", img_size=64).eval())
    with pytest.raises(LibraError, match="block blocks.0 of MlpMixer has no attention"):
        explain(model, torch.randn(1, 3, 64, 64), target=0, method="rollout")


def test_the_blocks_can_be_named_and_a_model_without_blocks_is_refused(vit):
    model, x = vit
    named = Explainer(model, blocks="blocks").explain(x, target=3, method="fullgrad+")
    found = explain(model, x, target=3, method="fullgrad+")
    torch.testing.assert_close(named.token_map, found.token_map)
    with pytest.raises(LibraError, match="blocks='stem' is not a run.*the runs found are: blocks"):
        Explainer(model, blocks="stem").explain(x, target=3, method="fullgrad+")
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.LazyLinear(2)).eval()
    cnn(x)
    with pytest.raises(LibraError, match="no repeated blocks.*blocks='path.to.blocks'"):
        explain(cnn, x, target=1, method="input_x_gradient")


def test_torchvision_blocks_named_with_a_stem():
    """torchvision names its blocks encoder.layers.encoder_layer_0, _1, ...; they are found, and
    its nn.MultiheadAttention ViT is complete under Libra."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    model = perturb(VisionTransformer(image_size=64, patch_size=16, num_layers=3, num_heads=2,
                                         hidden_dim=32, mlp_dim=64, num_classes=10).eval())
    x = torch.randn(2, 3, 64, 64)
    libra = explain(model, x, target=3, method="fullgrad+")
    vanilla = explain(model, x, target=3, method="fullgrad+", libra=False)
    assert libra.token_map.shape == (2, 17) and libra.prefix == 1
    assert _relative(libra.total, libra.score).max() < 1e-4
    assert _relative(vanilla.total, vanilla.score).max() > 1e-2
    for name in ("encoder.layers", "encoder.layers.encoder_layer_"):
        named = Explainer(model, blocks=name).explain(x, target=3, method="fullgrad+")
        torch.testing.assert_close(named.token_map, libra.token_map)
    rollout = explain(model, x, target=3, method="rollout")
    assert rollout.token_map.shape == (2, 17)


class _Flattened(torch.nn.Module):
    """An MLP run on (B·T, C) rows: the same function, with the batch folded into the rows."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        return self.inner(x.reshape(b * t, c)).reshape(b, t, -1)


def test_bias_maps_of_a_batch_folded_into_the_rows(vit):
    model, x = vit
    folded = copy.deepcopy(model)
    for block in folded.blocks:
        block.mlp = _Flattened(block.mlp).eval()
    plain = explain(model, x, target=3, method="fullgrad+")
    flat = explain(folded, x, target=3, method="fullgrad+")
    assert _relative(flat.total, flat.score).max() < 1e-4
    torch.testing.assert_close(flat.token_map, plain.token_map, rtol=1e-4, atol=1e-6)
