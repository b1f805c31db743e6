"""``libragrad-fx demo``: the shipped ViT and CLIP on a shipped image of two digits.

It prints the rewrite report, the completeness error of FullGrad+ in both forms and the
class-discrimination share of every method, and draws vanilla and Libra maps side by side for
each digit (and, with the shipped CLIP, for a prompt naming each digit). The image is a PNG in
the package, not regenerated, so ``libragrad-fx explain`` can be pointed at the same file.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..digits import CAPTIONS, WeightsNotFoundError
from ..loading.inputs import open_image, prepare
from ..loading.models import LoadedModel, load
from ..metrics import class_discrimination, completeness_gap
from ..pictures import check_writable, save_grid
from .maps import FORM_NAMES, Query, panels, run_maps

DIGITS_DIR = Path(__file__).resolve().parent.parent / "digits"
IMAGE = DIGITS_DIR / "demo.png"
INFO = DIGITS_DIR / "demo.json"
METHODS = ("input_x_gradient", "integrated_gradients", "fullgrad+", "attcat")
FORMS = (False, True)
COMPLETE = "fullgrad+"


@dataclass(frozen=True)
class DemoImage:
    """The shipped canvas: its two digits' ``labels`` and exact ``masks`` (2, H, W)."""

    path: Path
    labels: tuple[int, int]
    masks: torch.Tensor


def shipped_image() -> DemoImage:
    """The PNG and its labels; each mask is the lit pixels inside that digit's box (the two
    boxes are disjoint, so this is exactly ``make_digits``' mask)."""
    info = json.loads(INFO.read_text())
    pixels = torch.from_numpy(np.asarray(open_image(IMAGE).convert("L")) > 0)
    masks = torch.zeros(2, *pixels.shape, dtype=torch.bool)
    for k, (top, left, bottom, right) in enumerate(info["boxes"]):
        masks[k, top:bottom, left:right] = pixels[top:bottom, left:right]
    return DemoImage(IMAGE, tuple(info["labels"]), masks)


def write_demo_image(index: int, *, n: int, seed: int, split: str = "test") -> DemoImage:
    """Write canvas ``index`` of ``make_digits(split, n, two=True, seed=seed)`` as the shipped
    PNG and JSON (run once, by hand, to choose the demo image)."""
    from PIL import Image

    from ..digits import make_digits

    canvases = make_digits(split, n, two=True, seed=seed)
    grey = canvases.images[index, 0].numpy()
    Image.fromarray(np.round(grey * 255).astype(np.uint8), mode="L").save(IMAGE)
    boxes = []
    for mask in canvases.masks[index]:
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        boxes.append([int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1])
    info = {"labels": canvases.labels[index].tolist(), "boxes": boxes,
            "source": {"split": split, "n": n, "two": True, "seed": seed, "index": index}}
    INFO.write_text(json.dumps(info, indent=1) + "\n")
    return shipped_image()


def _explain(loaded: LoadedModel, demo: DemoImage, prompts: bool) -> tuple[Query, dict]:
    picture = prepare(open_image(demo.path), demo.path.name, loaded.preprocessing, loaded.name)
    if prompts:
        targets = [CAPTIONS[label] for label in demo.labels]
        names = [f"“{t}”" for t in targets]
    else:
        targets, names = list(demo.labels), [f"target {label}" for label in demo.labels]
    query = Query(picture, targets, names)
    return query, run_maps(loaded.model, [query], METHODS, FORMS)


def _print_numbers(name: str, query: Query, results: dict, demo: DemoImage) -> None:
    """Completeness of FullGrad+ per target, and each method's class-discrimination share."""
    print(f"\n{name}: completeness error of FullGrad+, |Σ map + remainder − f(x)| / |f(x)|")
    gaps = {libra: completeness_gap(results[(0, COMPLETE, libra)]) for libra in FORMS}
    for t, target in enumerate(query.names):
        print(f"  {target}: " + "  ".join(f"{FORM_NAMES[libra]} {gaps[libra][t]:.2e}"
                                         for libra in FORMS))
    print(f"{name}: class discrimination, the share of positive attribution on the targeted "
          "digit (1 = all on it, 0 = all on the other), per target")
    other = demo.masks.flip(0)
    print(f"  {'method':<22}" + "".join(f"{FORM_NAMES[libra]:>16}" for libra in FORMS))
    for method in METHODS:
        cells = []
        for libra in FORMS:
            share = class_discrimination(results[(0, method, libra)], demo.masks, other)
            cells.append(" ".join(f"{s:.2f}" for s in share.tolist()))
        print(f"  {method:<22}" + "".join(f"{c:>16}" for c in cells))


def run(args: argparse.Namespace) -> None:
    """The demo; the CLIP panel is left out, with a note, while its weights are not shipped."""
    from ..compiler.transform import libra_transform

    check_writable(args.output)
    demo = shipped_image()
    vit = load("digits:vit")
    print(f"rewrite report of digits:vit (trained on digit canvases, shipped with the package)\n"
          f"{libra_transform(vit.model).libra_report}")
    query, results = _explain(vit, demo, prompts=False)
    _print_numbers("digits:vit", query, results, demo)
    rows = panels([query], results, METHODS, FORMS, label="digits:vit")
    try:
        clip = load("digits:clip")
    except WeightsNotFoundError:
        print("libragrad-fx: note: the CLIP weights are not shipped yet; the CLIP panel is left "
              "out", file=sys.stderr)
    else:
        query, results = _explain(clip, demo, prompts=True)
        _print_numbers("digits:clip", query, results, demo)
        rows += panels([query], results, METHODS, FORMS, label="digits:clip")
    title = (f"LibraGrad on two digits ({demo.labels[0]} and {demo.labels[1]}): "
             "vanilla and Libra maps of each target")
    path = save_grid(rows, args.output, title=title, scale=args.scale)
    print(f"\nwrote {path}")
