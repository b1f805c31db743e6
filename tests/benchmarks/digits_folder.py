"""A labelled image folder with ImageNet-S masks, written from digits canvases: what a user's
dataset looks like on disk, so that the real-data path of the benchmark is the tested path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from libragrad_fx.digits import data

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_folder(root: Path, count: int, seed: int = 3) -> tuple[Path, Path, Path]:
    """``count`` PNGs under root/images/<class word>/ (half single-digit, half two-digit, filed
    under the first digit's class), their masks under root/masks/ (class id + 1 per pixel) and
    root/classes.txt, the words in the models' class order."""
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(WORDS) + "\n")
    single = data.make_digits("test", count // 2, seed=seed)
    two = data.make_digits("test", count - count // 2, two=True, seed=seed + 1)
    for i in range(len(single)):
        label = int(single.labels[i])
        ids = single.masks[i].numpy().astype(np.uint8) * (label + 1)
        _save(root, f"{WORDS[label]}/single{i:03d}", single.images[i], ids)
    for i in range(len(two)):
        a, b = (int(v) for v in two.labels[i])
        ids = (two.masks[i, 0].numpy().astype(np.uint8) * (a + 1)
               + two.masks[i, 1].numpy().astype(np.uint8) * (b + 1))
        _save(root, f"{WORDS[a]}/two{i:03d}", two.images[i], ids)
    return root / "images", root / "masks", root / "classes.txt"


def _save(root: Path, name: str, image, ids: np.ndarray) -> None:
    for part in ("images", "masks"):
        (root / part / name).parent.mkdir(parents=True, exist_ok=True)
    grey = (image[0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(grey).save(root / "images" / f"{name}.png")
    Image.fromarray(ids).save(root / "masks" / f"{name}.png")
