"""A labelled image folder a user has, with optional masks, read lazily in batches.

Two layouts: class subfolders (``DIR/<class>/<image>``; the label of a class is its line in a
classes file, the model's class order, or else its place among the sorted folder names, as in
torchvision's ImageFolder, which is ImageNet's order when every synset folder is there) or a
list file (``relative/path label`` per line, as ImageNet's validation lists are). Masks follow
ImageNet-S: one PNG per image under the masks folder at the same relative path with a ``.png``
suffix, the class id of each pixel in its value (or, for an RGB mask, ``R + 256·G``); 0 is
background. An image whose mask holds more than one nonzero id is multi-object; ``split`` keeps
single-object images, multi-object ones or all.
Only the file list is held in memory; images are decoded when their batch is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from libragrad_fx.loading.inputs import Preprocessing, open_image, prepare

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("all", "single", "multi")


class DataError(ValueError):
    """The folder, list or masks are not in a layout this reader knows; the message says why."""


@dataclass(frozen=True)
class Entry:
    path: Path
    name: str  # the path relative to the data folder: the key rows are stored under
    label: int
    mask: Path | None


@dataclass(frozen=True)
class Batch:
    names: list[str]
    x: Tensor  # (B, 3, H, W), preprocessed for the model
    labels: Tensor  # (B,) the folder's labels
    masks: Tensor | None  # (B, H, W) bool, object pixels at the model's input size


def class_names(data: Path, classes_file: Path | None = None) -> list[str]:
    """The class names in label order: the classes file's lines, else the sorted subfolders."""
    if classes_file is not None:
        return [line.strip() for line in Path(classes_file).read_text().splitlines()
                if line.strip()]
    return sorted(p.name for p in Path(data).iterdir() if p.is_dir())


def entries(data: Path, *, list_file: Path | None = None, masks: Path | None = None,
            split: str = "all", classes_file: Path | None = None) -> list[Entry]:
    """Every image of the folder (or list), in a fixed order, with its label and mask."""
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"--data {data} is not a folder")
    if split not in SPLITS:
        raise DataError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    if split != "all" and masks is None:
        raise DataError(f"--split {split} needs --masks: the object count is read off the masks")
    pairs = (_listed(data, list_file) if list_file is not None
             else _subfolders(data, class_names(data, classes_file)))
    found = []
    for path, label in pairs:
        mask = None
        if masks is not None:
            mask = Path(masks) / path.relative_to(data).with_suffix(".png")
            if not mask.is_file():
                raise DataError(f"no mask for {path.relative_to(data)}: expected {mask}")
        found.append(Entry(path, path.relative_to(data).as_posix(), label, mask))
    if split != "all":
        single = split == "single"
        found = [e for e in found if (_objects(e.mask) <= 1) == single]
    if not found:
        raise DataError(f"no images in {data}" + (f" for --split {split}" if split != "all"
                                                  else ""))
    return found


def _subfolders(data: Path, classes: list[str]) -> list[tuple[Path, int]]:
    if not classes:
        raise DataError(f"{data} has no class subfolders; put each class's images in "
                        "DIR/<class>/, or pass --list FILE with 'relative/path label' lines")
    unknown = sorted(p.name for p in data.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise DataError(f"folders {', '.join(unknown[:5])} are not in the classes file")
    return [(path, label) for label, name in enumerate(classes)
            if (data / name).is_dir()
            for path in sorted((data / name).rglob("*")) if path.suffix.lower() in SUFFIXES]


def _listed(data: Path, list_file: Path) -> list[tuple[Path, int]]:
    pairs = []
    for number, line in enumerate(Path(list_file).read_text().splitlines(), 1):
        if not line.strip():
            continue
        *path, label = line.split()
        if not path or not label.lstrip("-").isdigit():
            raise DataError(f"{list_file}:{number}: expected 'relative/path label', got {line!r}")
        image = data / " ".join(path)
        if not image.is_file():
            raise DataError(f"{list_file}:{number}: {image} does not exist")
        pairs.append((image, int(label)))
    return pairs


def mask_ids(path: Path) -> np.ndarray:
    """The class id of each pixel of an ImageNet-S mask (R + 256·G for an RGB one)."""
    values = np.asarray(Image.open(path))
    if values.ndim == 3:
        return values[..., 0].astype(np.int64) + 256 * values[..., 1].astype(np.int64)
    return values.astype(np.int64)


def _objects(path: Path | None) -> int:
    ids = np.unique(mask_ids(path))
    return int((ids != 0).sum())


def batches(chosen: list[Entry], prep: Preprocessing, model_name: str,
            size: int) -> Iterator[Batch]:
    """The entries decoded and preprocessed, ``size`` at a time, in order."""
    for start in range(0, len(chosen), size):
        part = chosen[start:start + size]
        pictures, masks = [], []
        for entry in part:
            image = open_image(entry.path)
            if prep.size is not None and image.size[::-1] != tuple(prep.size):
                image = image.resize(tuple(prep.size)[::-1], Image.BILINEAR)
            pictures.append(prepare(image, entry.name, prep, model_name).x)
            if entry.mask is not None:
                ids = Image.fromarray(mask_ids(entry.mask).astype(np.int32))
                ids = ids.resize(tuple(pictures[-1].shape[-2:])[::-1], Image.NEAREST)
                masks.append(torch.from_numpy(np.asarray(ids) != 0))
        yield Batch([e.name for e in part], torch.cat(pictures),
                    torch.tensor([e.label for e in part]),
                    torch.stack(masks) if masks else None)
