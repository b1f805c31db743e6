"""Handwritten digits pasted onto a black canvas, with the exact pixels of each digit.

Real images with exact ground-truth masks are what localisation and class-discrimination metrics
need (DESIGN.md §5), and scikit-learn ships the UCI digits without a download (§6). Each 8×8
digit is upscaled to 16×16 by nearest neighbour (every source pixel becomes a 2×2 block), so a
digit's mask is exactly the set of its upscaled pixels with intensity > 0 and no interpolation
halo blurs it. Train, val and test canvases draw on disjoint sets of source digits.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["DIGIT_SIZE", "SPLITS", "DigitImages", "make_digits", "split_sources"]

SPLITS = ("train", "val", "test")
DIGIT_SIZE = 16  # side of a pasted digit, in canvas pixels
_FRACTIONS = (0.6, 0.2)  # train, val; test takes the rest


@dataclass(frozen=True)
class DigitImages:
    """A batch of canvases: ``images`` (n, 3, s, s) float32 in [0, 1], ``labels`` int64 (n,)
    or (n, 2), ``masks`` bool (n, s, s) or (n, 2, s, s), ``sources`` the indices into
    ``load_digits()`` that were pasted, shaped like ``labels``."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    sources: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 source digits as float32 16×16 images in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = bunch.images.astype(np.float32) / 16.0  # (1797, 8, 8), values 0..16 in the file
    big = small.repeat(2, axis=1).repeat(2, axis=2)  # nearest-neighbour 8×8 → 16×16
    return big, bunch.target.astype(np.int64)


def split_sources(seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint index sets into the 1797 source digits: 60% train, 20% val, 20% test.

    A seeded permutation, so that a canvas of one split never reuses a digit of another.
    """
    total = len(_digits()[1])
    perm = np.random.default_rng([seed, 0x5EED]).permutation(total)
    n_train = round(total * _FRACTIONS[0])
    n_val = round(total * _FRACTIONS[1])
    return {
        "train": np.sort(perm[:n_train]),
        "val": np.sort(perm[n_train:n_train + n_val]),
        "test": np.sort(perm[n_train + n_val:]),
    }


def _pick_of_class(rng: np.random.Generator, pool: np.ndarray, labels: np.ndarray,
                   wanted: np.ndarray) -> np.ndarray:
    """One random source of class ``wanted[i]`` from ``pool`` for each i, vectorised."""
    order = pool[np.argsort(labels[pool], kind="stable")]
    counts = np.bincount(labels[pool], minlength=10)
    if (counts == 0).any():
        raise ValueError(f"the split lacks digits of class {np.flatnonzero(counts == 0)}")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    offset = np.floor(rng.random(len(wanted)) * counts[wanted]).astype(np.int64)
    return order[starts[wanted] + offset]


def _paste(canvas: np.ndarray, digits: np.ndarray, top: np.ndarray, left: np.ndarray) -> None:
    """Write ``digits`` (n, 16, 16) into ``canvas`` (n, s, s) at per-image offsets."""
    span = np.arange(DIGIT_SIZE)
    rows = (top[:, None] + span)[:, :, None]
    cols = (left[:, None] + span)[:, None, :]
    canvas[np.arange(len(canvas))[:, None, None], rows, cols] = digits


def make_digits(split: str, n: int, *, two: bool = False, size: int = 48,
                seed: int = 0) -> DigitImages:
    """``n`` canvases of ``size``×``size`` with one digit (or two of different classes).

    Positions are uniform over the canvas. Two digits get disjoint bounding boxes: a random
    axis separates them, so their masks are disjoint and neither hides part of the other. The
    result depends only on the arguments; grey is replicated to 3 channels and not normalised,
    because the models of :mod:`libragrad_fx.digits.models` take these images directly.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    need = 2 * DIGIT_SIZE if two else DIGIT_SIZE
    if size < need:
        raise ValueError(f"size must be >= {need} for {'two digits' if two else 'a digit'}")
    big, labels_all = _digits()
    pool = split_sources()[split]
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), int(two), size])
    free = size - DIGIT_SIZE  # last valid offset
    if not two:
        src = pool[rng.integers(len(pool), size=n)]
        top = rng.integers(free + 1, size=n)
        left = rng.integers(free + 1, size=n)
        canvas = np.zeros((n, size, size), np.float32)
        _paste(canvas, big[src], top, left)
        masks = canvas > 0
        sources = src
    else:
        first = pool[rng.integers(len(pool), size=n)]
        other = (labels_all[first] + rng.integers(1, 10, size=n)) % 10
        second = _pick_of_class(rng, pool, labels_all, other)
        # Along the separating axis: first digit in [0, size-32], second at least 16 further.
        a = rng.integers(size - 2 * DIGIT_SIZE + 1, size=n)
        b = a + DIGIT_SIZE + np.floor(rng.random(n) * (free - a - DIGIT_SIZE + 1)).astype(np.int64)
        across = rng.integers(free + 1, size=(n, 2))  # free coordinate of each digit
        swap = rng.random(n) < 0.5  # which digit comes first along the axis
        pos_1, pos_2 = np.where(swap, b, a), np.where(swap, a, b)
        vertical = rng.random(n) < 0.5
        top_1 = np.where(vertical, pos_1, across[:, 0])
        left_1 = np.where(vertical, across[:, 0], pos_1)
        top_2 = np.where(vertical, pos_2, across[:, 1])
        left_2 = np.where(vertical, across[:, 1], pos_2)
        one = np.zeros((n, size, size), np.float32)
        two_ = np.zeros((n, size, size), np.float32)
        _paste(one, big[first], top_1, left_1)
        _paste(two_, big[second], top_2, left_2)
        canvas = one + two_
        masks = np.stack([one > 0, two_ > 0], axis=1)
        sources = np.stack([first, second], axis=1)
    images = torch.from_numpy(canvas)[:, None].expand(n, 3, size, size).contiguous()
    return DigitImages(
        images=images,
        labels=torch.from_numpy(labels_all[sources]),
        masks=torch.from_numpy(masks),
        sources=torch.from_numpy(sources),
    )
