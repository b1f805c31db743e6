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
    digits models were trained), the resampling filter, and whether the model ``stated`` its
    normalisation (False: none was found, and [0, 1] values are a guess)."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    grey: bool = False
    interpolation: str = "bilinear"
    stated: bool = True


@dataclass(frozen=True)
class Picture:
    """One image as the model sees it: ``x`` (1, 3, H, W), and ``image`` in [0, 1] for drawing
    maps over it, (H, W) for a grey picture or (H, W, 3) for a colour one."""

    name: str
    x: torch.Tensor
    image: np.ndarray


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


# Modes PIL keeps wider than 8 bits, and the value that is white in each: a 16-bit grey PNG
# converted to "L" would be clipped at 255 out of 65535, near binary.
_WIDE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "F": 1.0}


def _values(image, grey: bool, size: tuple[int, int] | None, resample: int) -> np.ndarray:
    """(H, W) grey or (H, W, 3) colour float32 values in [0, 1], resized to ``size``."""
    from PIL import Image

    if image.mode in _WIDE or image.mode == "I":
        white = _WIDE.get(image.mode) or (65535.0 if np.asarray(image).max() > 255 else 255.0)
        image = Image.fromarray(np.asarray(image, dtype=np.float32) / white)
        if size is not None:
            image = image.resize(size[::-1], resample)
        values = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        return values if grey else np.repeat(values[..., None], 3, axis=-1)
    image = image.convert("L" if grey else "RGB")
    if size is not None:
        image = image.resize(size[::-1], resample)
    return np.asarray(image, dtype=np.float32) / 255.0


def prepare(image, name: str, prep: Preprocessing, model_name: str) -> Picture:
    """Resize (with a note on stderr) and normalise one PIL image for the model."""
    size = None
    if prep.size is not None and image.size[::-1] != tuple(prep.size):
        (h, w), (want_h, want_w) = image.size[::-1], prep.size
        print(f"libragrad-fx: note: resized {name} from {w}x{h} to {want_w}x{want_h}, the size "
              f"{model_name} takes", file=sys.stderr)
        size = tuple(prep.size)
    values = torch.from_numpy(_values(image, prep.grey, size, _filter(prep.interpolation)))
    x = values[None].expand(3, -1, -1) if prep.grey else values.permute(2, 0, 1)
    if prep.mean is not None:
        mean = torch.tensor(prep.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(prep.std or (1.0,) * len(prep.mean))[:, None, None]
        x = (x - mean) / std
    return Picture(name, x.contiguous()[None], values.numpy())
