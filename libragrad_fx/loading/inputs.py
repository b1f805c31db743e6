"""Image files → model inputs, following the model's own preprocessing, kept small and visible.

An image of another size than the model takes is resized, with a note saying from what to what,
rather than centre-cropped: an explanation should cover the whole picture the user gave.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError


@dataclass(frozen=True)
class Preprocessing:
    """What a model wants: ``size`` (H, W) or None for any, per-channel ``mean``/``std`` (None:
    the [0, 1] values as they are), ``grey`` (one grey channel replicated to three, as the
    digits models were trained), and the resampling filter."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    grey: bool = False
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class Picture:
    """One image as the model sees it: ``x`` (1, 3, H, W) and ``grey`` (H, W) in [0, 1] for
    drawing maps over it."""

    name: str
    x: torch.Tensor
    grey: np.ndarray


def open_image(path: str | Path):
    """The decoded image (PIL), or an InputError saying why the file cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
            "not an image file PIL can read" if "identify" in str(exc) else str(exc))
        raise InputError(f"cannot read image {path}: {' '.join(reason.split())}") from exc


def _filter(name: str) -> int:
    from PIL import Image

    return {"nearest": Image.Resampling.NEAREST, "bicubic": Image.Resampling.BICUBIC}.get(
        name, Image.Resampling.BILINEAR)


def prepare(image, name: str, prep: Preprocessing, model_name: str) -> Picture:
    """Resize (with a note on stderr) and normalise one PIL image for the model."""
    image = image.convert("L" if prep.grey else "RGB")
    if prep.size is not None and image.size[::-1] != tuple(prep.size):
        (h, w), (want_h, want_w) = image.size[::-1], prep.size
        print(f"libragrad-fx: note: resized {name} from {w}x{h} to {want_w}x{want_h}, the size "
              f"{model_name} takes", file=sys.stderr)
        image = image.resize((want_w, want_h), _filter(prep.interpolation))
    values = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    x = values[None].expand(3, -1, -1) if prep.grey else values.permute(2, 0, 1)
    grey = values.numpy() if prep.grey else values.numpy().mean(-1)
    if prep.mean is not None:
        mean = torch.tensor(prep.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(prep.std or (1.0,) * len(prep.mean))[:, None, None]
        x = (x - mean) / std
    return Picture(name, x.contiguous()[None], grey)

