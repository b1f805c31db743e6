"""libragrad_fx.metrics: token removal, completeness gap, localisation AP, class discrimination.

The references are independent of the metric code: a toy model whose target logit is a known
positive sum of patch contributions (so the best and worst removal orders are known and the
curves can be written down), timm models with the removal redone by hand through their own
modules, and AP from its definition (and scikit-learn when installed).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from libragrad_fx import Explanation, InputError, explain
from libragrad_fx.metrics import (
    RemovalCurves,
    average_precision,
    class_discrimination,
    completeness_gap,
    token_removal,
)

warnings.filterwarnings("ignore", message="No pretrained weights")
PATCH, SIDE, DEPTH = 8, 32, 2
GRID = SIDE // PATCH
FRACTIONS = [i / 10 for i in range(10)]


class _Block(nn.Module):
    """h + h·W, token by token: runs on any number of tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.linear(h)


class Additive(nn.Module):
    """Logit 0 = GAIN · (class token's channel 0 + Σ_patches mean intensity), logit 1 = a
    fixed threshold: every patch adds a known amount, so its influence is known."""

    GAIN = 1.5 ** DEPTH

    def __init__(self, threshold: float, dim: int = 6):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, PATCH, PATCH, bias=False)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(*[_Block(dim) for _ in range(DEPTH)])
        self.head = nn.Linear(dim, 2)
        with torch.no_grad():
            self.embed.weight.normal_()
            self.embed.weight[0] = 1.0 / (3 * PATCH * PATCH)
            for block in self.blocks:
                block.linear.weight.copy_(0.5 * torch.eye(dim))
            self.head.weight.zero_()
            self.head.weight[0, 0] = 1.0
            self.head.bias.copy_(torch.tensor([0.0, threshold]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        return self.head(self.blocks(h).sum(1))


@pytest.fixture(scope="module")
def additive():
    torch.manual_seed(0)
    x = torch.rand(3, 3, SIDE, SIDE)
    means = x.reshape(3, 3, GRID, PATCH, GRID, PATCH).mean((1, 3, 5)).reshape(3, -1)
    threshold = float(Additive.GAIN * means.sum(1).mean() / 2)
    return Additive(threshold).eval(), x, means


def _expected(model: Additive, means: torch.Tensor, order: torch.Tensor) -> tuple:
    """Probability and accuracy of class 0 after removing the first round(r·P) patches of
    ``order`` (B, P), written down from the model's definition."""
    base = model.GAIN * model.cls_token[0, 0, 0].item()
    threshold = model.head.bias[1].item()
    probability, accuracy = [], []
    for r in FRACTIONS:
        k = round(r * means.shape[1])
        kept = means.gather(1, order[:, k:]).sum(1)
        logits = torch.stack([base + model.GAIN * kept, torch.full_like(kept, threshold)], 1)
        probability.append(logits.double().softmax(1)[:, 0])
        accuracy.append((logits[:, 0] > logits[:, 1]).double())
    return torch.stack(probability, 1), torch.stack(accuracy, 1)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding (the runs batch rows differently)."""
    torch.testing.assert_close(actual, expected.to(actual), atol=1e-6, rtol=1e-5)


def _trapezoid(curve: torch.Tensor) -> torch.Tensor:
    step = FRACTIONS[1] - FRACTIONS[0]
    return step * (curve[:, 1:] + curve[:, :-1]).sum(1) / 2


def test_removal_curves_match_the_written_down_model(additive):
    model, x, means = additive
    target = torch.zeros(3, dtype=torch.long)
    result = token_removal(model, x, means.reshape(3, GRID, GRID), target)
    assert isinstance(result, RemovalCurves) and result.mode == "drop"
    assert result.mif_probability.shape == (3, 10) and result.srg_probability.shape == (3,)
    best = means.argsort(1, descending=True)
    mif_p, mif_a = _expected(model, means, best)
    lif_p, lif_a = _expected(model, means, best.flip(1))
    torch.testing.assert_close(result.mif_probability, mif_p, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.lif_probability, lif_p, atol=1e-5, rtol=0)
    assert torch.equal(result.mif_accuracy, mif_a) and torch.equal(result.lif_accuracy, lif_a)
    assert bool(mif_a[:, 0].all()) and not bool(mif_a[:, -1].any())  # the test has teeth
    torch.testing.assert_close(result.mif_probability_area, _trapezoid(mif_p))
    torch.testing.assert_close(result.srg_accuracy, _trapezoid(lif_a) - _trapezoid(mif_a))
    summary = result.mean()
    assert summary["srg_probability"] == pytest.approx(
        float((_trapezoid(lif_p) - _trapezoid(mif_p)).mean()), abs=1e-5)


def test_a_perfect_ranking_beats_random_which_beats_reversed(additive):
    model, x, means = additive
    generator = torch.Generator().manual_seed(3)
    maps = {"perfect": means, "random": torch.randn(means.shape, generator=generator),
            "reversed": -means}
    curves = {name: token_removal(model, x, m, 0, mode="zero") for name, m in maps.items()}
    mif = [curves[n].mif_probability for n in ("perfect", "random", "reversed")]
    lif = [curves[n].lif_probability for n in ("perfect", "random", "reversed")]
    eps = 1e-6
    assert bool((mif[0] <= mif[1] + eps).all() and (mif[1] <= mif[2] + eps).all())
    assert bool((lif[0] >= lif[1] - eps).all() and (lif[1] >= lif[2] - eps).all())
    srg = [curves[n].srg_probability for n in ("perfect", "random", "reversed")]
    assert bool((srg[0] > srg[1]).all() and (srg[1] > srg[2]).all())
    assert bool((srg[0] > 0).all() and (srg[2] < 0).all())


def test_drop_zero_and_pixel_agree_where_removal_means_the_same(additive):
    """Sum pooling, token-wise blocks and a bias-free patch embedding: dropping a token,
    zeroing it and blacking out its pixels all remove exactly its contribution."""
    model, x, means = additive
    attribution = torch.randn(means.shape, generator=torch.Generator().manual_seed(4))
    runs = [token_removal(model, x, attribution, 0, mode=m) for m in ("drop", "zero", "pixel")]
    assert [r.mode for r in runs] == ["drop", "zero", "pixel"]
    for other in runs[1:]:
        torch.testing.assert_close(other.mif_probability, runs[0].mif_probability, atol=1e-6,
                                   rtol=0)
        torch.testing.assert_close(other.lif_probability, runs[0].lif_probability, atol=1e-6,
                                   rtol=0)


def test_a_flat_map_favours_neither_curve(additive):
    model, x, means = additive
    result = token_removal(model, x, torch.zeros_like(means), 0, mode="zero", seed=1)
    again = token_removal(model, x, torch.zeros_like(means), 0, mode="zero", seed=1)
    assert torch.equal(result.mif_probability, again.mif_probability)
    # ties are broken at random, not in raster order (which would rank the first rows first)
    raster = _expected(model, means, torch.arange(means.shape[1]).expand_as(means))[0]
    assert not torch.allclose(result.mif_probability, raster.to(result.mif_probability))


class _PerToken(Additive):
    """One pair of logits per token, flattened: fewer tokens give a shorter output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        return self.head(self.blocks(h)).flatten(1)


def test_an_output_that_changes_shape_is_not_dropped(additive):
    _, x, means = additive
    model = _PerToken(0.0).eval()
    result = token_removal(model, x, means, 0)
    assert result.mode == "zero" and "output" in result.fallback


@pytest.fixture(scope="module")
def vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(5)
    model = VisionTransformer(img_size=SIDE, patch_size=PATCH, embed_dim=32, depth=2,
                              num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, torch.randn(2, 3, SIDE, SIDE)


@pytest.fixture(scope="module")
def mixer():
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(6)
    model = MlpMixer(img_size=SIDE, patch_size=PATCH, num_blocks=2, embed_dim=32,
                     num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, torch.randn(2, 3, SIDE, SIDE)


def _removed_patches(attribution: torch.Tensor, r: float) -> torch.Tensor:
    """(B, P) bool: MIF's top round(r·P) patches."""
    k = round(r * attribution.shape[1])
    top = attribution.argsort(1, descending=True)[:, :k]
    return torch.zeros_like(attribution, dtype=torch.bool).scatter(1, top, True)


def _probability(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return output.double().softmax(1).gather(1, target[:, None])[:, 0]


def test_a_vit_drops_tokens_as_its_own_modules_would(vit):
    model, x = vit
    target = torch.tensor([1, 7])
    attribution = torch.randn(2, GRID * GRID, generator=torch.Generator().manual_seed(7))
    result = token_removal(model, x, attribution, target, internal_batch_size=5)
    assert result.mode == "drop" and result.fallback is None
    with torch.no_grad():
        full = model(x)
        _close(result.mif_probability[:, 0], _probability(full, target))
        for j in (3, 9):
            gone = _removed_patches(attribution, FRACTIONS[j])
            h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
            kept = (~gone).nonzero()[:, 1].reshape(2, -1) + 1  # model positions, cls at 0
            h = torch.cat([h[:, :1], h.gather(1, kept[..., None].expand(-1, -1, h.shape[-1]))],
                          1)
            out = model.forward_head(model.norm(model.blocks(h)))
            _close(result.mif_probability[:, j], _probability(out, target))
    zero = token_removal(model, x, attribution, target, mode="zero")
    assert zero.mode == "zero"
    assert not torch.allclose(zero.mif_probability[:, 1:], result.mif_probability[:, 1:])
    _close(zero.mif_probability[:, 0], result.mif_probability[:, 0])


def test_a_mixer_falls_back_to_zeroing(vit, mixer):
    model, x = mixer
    target = torch.tensor([2, 4])
    attribution = torch.randn(2, GRID, GRID, generator=torch.Generator().manual_seed(8))
    result = token_removal(model, x, attribution, target)
    assert result.mode == "zero" and "tokens" in result.fallback
    with torch.no_grad():
        j = 5
        gone = _removed_patches(attribution.flatten(1), FRACTIONS[j])
        h = model.stem(x).masked_fill(gone[..., None], 0)
        out = model.forward_head(model.norm(model.blocks(h)))
        _close(result.mif_probability[:, j], _probability(out, target))
    with pytest.raises(InputError, match="cannot drop"):
        token_removal(model, x, attribution, target, mode="drop")


@pytest.mark.parametrize("name", ["vit", "mixer"])
def test_pixel_removal_runs_on_any_model(name, request):
    model, x = request.getfixturevalue(name)
    target = torch.tensor([3, 3])
    attribution = torch.randn(2, GRID, GRID, generator=torch.Generator().manual_seed(9))
    result = token_removal(model, x, attribution, target, mode="pixel", fill=0.5,
                           progress=True)
    assert result.mode == "pixel"
    j = 4
    gone = _removed_patches(attribution.flatten(1), FRACTIONS[j]).reshape(2, GRID, GRID)
    pixels = gone.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)[:, None]
    with torch.no_grad():
        out = model(torch.where(pixels, torch.full_like(x, 0.5), x))
    _close(result.mif_probability[:, j], _probability(out, target))
    torch.testing.assert_close(result.lif_probability[:, 0], result.mif_probability[:, 0])


def test_removal_takes_an_explanation_and_rejects_bad_input(vit):
    model, x = vit
    e = explain(model, x, target=1, method="input_x_gradient")
    result = token_removal(model, x, e, 1)
    same = token_removal(model, x, e.patch_map.flatten(1), 1)
    assert torch.equal(result.mif_probability, same.mif_probability)
    with pytest.raises(InputError, match="mode"):
        token_removal(model, x, e, 1, mode="blur")
    with pytest.raises(InputError, match="fractions"):
        token_removal(model, x, e, 1, fractions=[0.0, 1.0])
    with pytest.raises(InputError, match="grid"):
        token_removal(model, x, torch.zeros(2, 8, 2), 1)
    with pytest.raises(InputError, match="patches"):
        token_removal(model, x, torch.zeros(2, 9), 1)
    with pytest.raises(InputError, match="grid"):
        token_removal(model, x, torch.zeros(2, 8), 1, mode="pixel")


def test_completeness_gap():
    e = Explanation(torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.zeros(2, 1, 1),
                    torch.tensor([0.5, 0.0]), torch.tensor([4.0, 4.0]), None, "fullgrad", True)
    torch.testing.assert_close(completeness_gap(e, relative=False),
                               torch.tensor([0.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(completeness_gap(e), torch.tensor([0.125, 0.5],
                                                                 dtype=torch.float64))
    ig = Explanation(e.token_map, e.patch_map, torch.zeros(2), e.score, torch.tensor([1.0, 2.0]),
                     "integrated_gradients", False)
    torch.testing.assert_close(completeness_gap(ig), torch.tensor([0.0, 0.0],
                                                                  dtype=torch.float64))


def test_completeness_gap_of_libra_fullgrad_is_small(vit):
    model, x = vit
    libra = explain(model, x, target=1, method="fullgrad")
    vanilla = explain(model, x, target=1, method="fullgrad", libra=False)
    assert float(completeness_gap(libra).max()) < 1e-4
    assert float(completeness_gap(vanilla).max()) > 100 * float(completeness_gap(libra).max())


def _reference_ap(scores: list[float], labels: list[bool]) -> float:
    """AP = Σ_n (R_n − R_{n−1}) P_n, thresholds at the distinct scores, highest first."""
    positives = sum(labels)
    ap, recall_before = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        chosen = [lab for s, lab in zip(scores, labels, strict=True) if s >= threshold]
        tp = sum(chosen)
        recall = tp / positives
        ap += (recall - recall_before) * tp / len(chosen)
        recall_before = recall
    return ap


def test_average_precision_small_cases_by_hand():
    scores = torch.tensor([[[0.9, 0.8], [0.7, 0.6]], [[0.5, 0.5], [0.2, 0.1]]])
    mask = torch.tensor([[[1, 0], [1, 0]], [[1, 0], [1, 0]]], dtype=torch.bool)
    # image 0: P = 1 at R = 1/2, P = 2/3 at R = 1; image 1: the tie enters at once (P = 1/2)
    expected = torch.tensor([0.5 * 1 + 0.5 * 2 / 3, 0.5 * 0.5 + 0.5 * 2 / 3])
    torch.testing.assert_close(average_precision(scores, mask), expected)
    empty = average_precision(scores, torch.zeros_like(mask))
    assert bool(empty.isnan().all())
    full = average_precision(scores, torch.ones_like(mask))
    torch.testing.assert_close(full, torch.ones(2))


def _tied_maps(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (4, 7, 9), generator=generator).float() / 5 - 0.3
    mask = torch.rand(4, 7, 9, generator=generator) < 0.3
    return scores, mask


def test_average_precision_matches_the_definition_with_ties():
    scores, mask = _tied_maps(10)
    result = average_precision(scores, mask)
    for i in range(scores.shape[0]):
        reference = _reference_ap(scores[i].flatten().tolist(), mask[i].flatten().tolist())
        assert float(result[i]) == pytest.approx(reference, abs=1e-6)


def test_average_precision_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    for seed in range(3):
        scores, mask = _tied_maps(20 + seed)
        result = average_precision(scores, mask)
        for i in range(scores.shape[0]):
            reference = metrics.average_precision_score(mask[i].flatten().numpy(),
                                                        scores[i].flatten().numpy())
            assert float(result[i]) == pytest.approx(reference, abs=1e-6)


def test_average_precision_upsamples_an_explanation():
    patches = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    e = Explanation(torch.zeros(1, 4), patches, torch.zeros(1), torch.zeros(1), None, "x", True)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[:, :4, :4] = True
    torch.testing.assert_close(average_precision(e, mask),
                               average_precision(e.heatmap(8), mask))
    assert float(average_precision(e, mask)) > float(average_precision(-e.heatmap(8), mask))


def test_class_discrimination():
    a = torch.zeros(3, 6, 6, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[:, :3] = True
    b[:, 3:] = True
    on_a = torch.where(a, 1.0, -2.0)  # negative evidence on b does not count
    torch.testing.assert_close(class_discrimination(on_a, a, b), torch.ones(3))
    torch.testing.assert_close(class_discrimination(on_a, b, a), torch.zeros(3))
    torch.testing.assert_close(class_discrimination(torch.ones(3, 6, 6), a, b),
                               torch.full((3,), 0.5))
    torch.testing.assert_close(class_discrimination(torch.zeros(3, 6, 6), a, b),
                               torch.full((3,), 0.5))
    mixed = torch.where(a, 3.0, 1.0)
    share = class_discrimination(mixed, a, b)
    torch.testing.assert_close(share, torch.full((3,), 3 / 4))
    torch.testing.assert_close(share + class_discrimination(mixed, b, a), torch.ones(3))
    assert not math.isnan(float(class_discrimination(torch.zeros(1, 2, 2), a[:1, :2, :2],
                                                     b[:1, :2, :2])))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_map_that_is_not_finite_is_refused_by_every_metric(additive, bad):
    model, x, means = additive
    maps = means.reshape(3, GRID, GRID).clone()
    maps[1, 0, 0] = bad
    mask = torch.zeros(3, SIDE, SIDE, dtype=torch.bool)
    mask[:, :8, :8] = True
    with pytest.raises(InputError, match=r"token_removal: the map has 1 NaN or .* \[1\]"):
        token_removal(model, x, maps, torch.zeros(3, dtype=torch.long))
    with pytest.raises(InputError, match=r"average_precision: the map has 64 NaN"):
        average_precision(maps.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2), mask)
    with pytest.raises(InputError, match=r"class_discrimination: the map has"):
        class_discrimination(maps, mask[:, :GRID, :GRID], ~mask[:, :GRID, :GRID])


def test_token_removal_checks_its_input_in_one_line_and_runs_under_inference_mode(additive):
    model, x, means = additive
    maps, target = means.reshape(3, GRID, GRID), torch.zeros(3, dtype=torch.long)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="token_removal: the input has 1 NaN"):
        token_removal(model, bad, maps, target)
    with pytest.raises(InputError, match="token_removal takes an input with 4 dimensions"):
        token_removal(model, x[0], maps, target)
    with pytest.raises(InputError, match="the input is torch.float64 but the model is"):
        token_removal(model, x.double(), maps, target)
    with torch.inference_mode():
        frozen = x.clone()
    assert torch.equal(token_removal(model, frozen, maps, target).mif_accuracy,
                       token_removal(model, x, maps, target).mif_accuracy)
