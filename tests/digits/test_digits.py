"""The digits canvases (exact masks, disjoint splits), the shipped models, and their training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from libragrad_fx.digits import (
    CAPTIONS,
    NAMES,
    WeightsNotFoundError,
    build,
    load,
    make_digits,
    split_sources,
    tokenize_captions,
)
from libragrad_fx.digits.data import DIGIT_SIZE, _digits
from libragrad_fx.digits.models import WEIGHTS_DIR, class_logits, weights_path
from libragrad_fx.errors import LibraError

# The bars the shipped weights must clear on 500 seeded test canvases (benchmarks/train_digits).
BARS = {"vit": 0.95, "mixer": 0.95, "eva": 0.95, "clip": 0.90}


# ---------------------------------------------------------------- data


def test_splits_are_disjoint_and_cover_all_sources():
    splits = split_sources()
    total = len(_digits()[1])
    sets = {k: set(v.tolist()) for k, v in splits.items()}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    assert set().union(*sets.values()) == set(range(total))
    assert len(sets["train"]) == round(0.6 * total)
    assert len(sets["val"]) == round(0.2 * total)
    assert all(np.array_equal(split_sources()[k], v) for k, v in splits.items())
    assert not np.array_equal(split_sources(seed=1)["test"], splits["test"])


@pytest.mark.parametrize("two", [False, True])
def test_canvases_use_only_their_split(two):
    splits = split_sources()
    for split in ("train", "val", "test"):
        d = make_digits(split, 200, two=two, seed=3)
        assert set(d.sources.flatten().tolist()) <= set(splits[split].tolist())


@pytest.mark.parametrize("two", [False, True])
def test_deterministic(two):
    a = make_digits("val", 64, two=two, seed=7)
    b = make_digits("val", 64, two=two, seed=7)
    for field in ("images", "labels", "masks", "sources"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    c = make_digits("val", 64, two=two, seed=8)
    assert not torch.equal(a.images, c.images)
    d = make_digits("test", 64, two=two, seed=7)
    assert not torch.equal(a.sources, d.sources)


def test_single_digit_shapes_range_and_masks():
    d = make_digits("train", 50, size=40, seed=1)
    assert d.images.shape == (50, 3, 40, 40) and d.images.dtype == torch.float32
    assert d.labels.shape == (50,) and d.labels.dtype == torch.int64
    assert d.masks.shape == (50, 40, 40) and d.masks.dtype == torch.bool
    assert len(d) == 50
    assert d.images.min() >= 0 and d.images.max() <= 1 and d.images.max() == 1
    assert torch.equal(d.images[:, 0], d.images[:, 1])
    assert torch.equal(d.images[:, 0], d.images[:, 2])
    assert torch.equal(d.masks, d.images[:, 0] > 0)
    _, labels = _digits()
    assert torch.equal(d.labels, torch.from_numpy(labels[d.sources.numpy()]))
    # each digit fits in a 16×16 box and its pixels are its source's, upscaled ×2
    big, _ = _digits()
    for i in range(5):
        ys, xs = torch.nonzero(d.masks[i], as_tuple=True)
        assert ys.max() - ys.min() < DIGIT_SIZE and xs.max() - xs.min() < DIGIT_SIZE
        assert d.masks[i].sum() == (big[d.sources[i]] > 0).sum()
        assert np.isclose(d.images[i, 0].sum().item(), big[d.sources[i]].sum())


def test_two_digits_disjoint_different_and_exact():
    d = make_digits("test", 300, two=True, seed=2)
    assert d.images.shape == (300, 3, 48, 48)
    assert d.labels.shape == (300, 2) and d.labels.dtype == torch.int64
    assert d.masks.shape == (300, 2, 48, 48) and d.masks.dtype == torch.bool
    assert (d.labels[:, 0] != d.labels[:, 1]).all()
    assert not (d.masks[:, 0] & d.masks[:, 1]).any()
    assert torch.equal(d.masks[:, 0] | d.masks[:, 1], d.images[:, 0] > 0)
    assert d.masks.flatten(2).any(-1).all()  # both digits visible in every image
    assert d.images.min() >= 0 and d.images.max() <= 1
    # every label pair and both layouts occur
    assert len(set(map(tuple, d.labels.tolist()))) > 60


def test_digit_positions_cover_the_canvas():
    d = make_digits("train", 2000, seed=0)
    ys, xs = torch.nonzero(d.masks.any(0), as_tuple=True)
    assert ys.min() <= 1 and xs.min() <= 1 and ys.max() >= 46 and xs.max() >= 46


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        make_digits("training", 4)
    with pytest.raises(ValueError, match="size"):
        make_digits("train", 4, two=True, size=24)
    assert make_digits("train", 0).images.shape == (0, 3, 48, 48)


# ---------------------------------------------------------------- models


def test_captions_and_tokenizer():
    assert len(CAPTIONS) == 10 and CAPTIONS[7] == "a handwritten seven"
    model = build("clip")
    assert model.context_length == 16 and model.vocab_size == 49408
    tokens = tokenize_captions()
    assert tokens.shape == (10, 16)
    assert torch.isfinite(model.encode_text(tokens)).all()


def test_unknown_model_and_missing_weights(tmp_path, monkeypatch):
    with pytest.raises(LibraError, match="unknown digits model"):
        build("resnet")
    import libragrad_fx.digits.models as models

    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(WeightsNotFoundError, match="benchmarks.train_digits") as info:
        load("vit")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, LibraError)


def test_save_load_round_trip_keeps_clip_file_small(tmp_path, monkeypatch):
    import libragrad_fx.digits.models as models

    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    torch.manual_seed(0)
    model = build("clip")
    with torch.no_grad():
        model.token_embedding.weight[[0, 7, 4000]] += 0.5
    path = models.save(model, "clip")
    assert path.stat().st_size < 1_000_000  # 49408×64 float16 alone would be 6.3 MB
    again = load("clip")
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), k
    assert torch.equal(model.token_embedding.weight[100], again.token_embedding.weight[100])


# ---------------------------------------------------------------- shipped weights


@pytest.fixture(scope="module")
def test_canvases():
    return make_digits("test", 500, seed=123)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_reaches_its_bar(name, test_canvases):
    torch.manual_seed(0)
    assert weights_path(name).is_file(), "run `python -m benchmarks.train_digits`"
    model = load(name)
    assert not model.training
    acc = (class_logits(model, test_canvases.images).argmax(1) == test_canvases.labels)
    assert acc.float().mean().item() >= BARS[name]


def test_metrics_file_lists_every_model():
    metrics = json.loads((WEIGHTS_DIR / "metrics.json").read_text())
    assert set(metrics) == set(NAMES)
    for name, row in metrics.items():
        assert row["test_accuracy"] >= BARS[name]
    assert metrics["clip"]["zero_shot_accuracy"] >= BARS["clip"]


# ---------------------------------------------------------------- training


def test_quick_training_runs(tmp_path, capsys):
    from benchmarks.train_digits import main

    threads = torch.get_num_threads()
    try:
        main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert all(f"{name}: test accuracy" in out for name in NAMES)
    assert not list(tmp_path.iterdir())  # --quick writes nothing


def test_training_warp_moves_a_digit_about_its_centre():
    """The warp reshapes each digit where it stands: its centre of mass stays within a pixel or
    two, its ink is neither lost nor doubled, and the canvas changes."""
    from benchmarks.train_digits import augment

    batch = make_digits("train", 32, seed=4)
    warped = augment(batch.images, batch.masks, torch.Generator().manual_seed(0))
    assert warped.shape == batch.images.shape
    assert not torch.allclose(warped, batch.images)

    def centre(images: torch.Tensor) -> torch.Tensor:
        grey = images[:, 0]
        axis = torch.arange(grey.shape[-1], dtype=torch.float32)
        mass = grey.sum((1, 2))
        rows, cols = (grey.sum(2) * axis).sum(1), (grey.sum(1) * axis).sum(1)
        return torch.stack([rows, cols], 1) / mass[:, None]

    assert (centre(warped) - centre(batch.images)).norm(dim=1).max() < 2.5
    ratio = warped.sum((1, 2, 3)) / batch.images.sum((1, 2, 3))
    assert ratio.min() > 0.6 and ratio.max() < 1.6
