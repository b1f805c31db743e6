"""``libragrad-fx explain``: maps of one or more images, methods and forms, as one picture."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from ..attribution import METHODS
from ..errors import InputError
from ..loading.inputs import Picture, open_image, prepare
from ..loading.models import LoadedModel, load
from ..pictures import check_writable, save_grid
from .maps import FORM_NAMES, Query, panels, run_maps

_PROMPT_CHARS = 28  # a prompt longer than this is cut in panel titles


def _quoted(text: str) -> str:
    short = text if len(text) <= _PROMPT_CHARS else text[:_PROMPT_CHARS - 1] + "…"
    return f"“{short}”"


def _class_queries(loaded: LoadedModel, pictures: Sequence[Picture],
                   targets: list[int] | None) -> list[Query]:
    """Class targets, checked against the model's output; by default the predicted class."""
    queries = []
    for picture in pictures:
        with torch.no_grad():
            out = loaded.model(picture.x)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise InputError(f"{loaded.name} does not output (batch, classes) scores, so "
                             "--target has no meaning for it")
        classes = out.shape[1]
        wanted = targets if targets else [int(out.argmax(1))]
        bad = [t for t in wanted if not 0 <= t < classes]
        if bad:
            raise InputError(f"--target {bad[0]} is out of range: {loaded.name} has {classes} "
                             f"classes (0 to {classes - 1})")
        names = [f"target {t}" if targets else f"target {t} (predicted)" for t in wanted]
        queries.append(Query(picture, wanted, names))
    return queries


def queries_for(loaded: LoadedModel, pictures: Sequence[Picture], targets: list[int] | None,
                texts: list[str] | None) -> list[Query]:
    """What to explain in each picture: prompts for a CLIP model, class indices otherwise."""
    if loaded.has_text:
        if not texts:
            raise InputError(f"{loaded.name} is a CLIP model: give prompts with --text \"…\"")
        return [Query(picture, texts, [_quoted(t) for t in texts]) for picture in pictures]
    if texts:
        raise InputError(f"--text needs a CLIP model (image and text towers); {loaded.name} "
                         "is a classifier: give --target N")
    return _class_queries(loaded, pictures, targets)


def _print_table(queries: Sequence[Query], results: dict, methods: Sequence[str],
                 forms: Sequence[bool]) -> None:
    """f(x) and what each map adds up to: equal for a complete method under LibraGrad."""
    print(f"{'image':<16} {'target':<30} {'method':<22} {'form':<8} {'f(x)':>10} "
          f"{'Σ map':>10}")
    for i, query in enumerate(queries):
        for t, name in enumerate(query.names):
            for method in methods:
                for libra in forms:
                    e = results[(i, method, libra)]
                    print(f"{query.picture.name:<16} {name:<30} {method:<22} "
                          f"{FORM_NAMES[libra]:<8} {float(e.score[t]):>10.4g} "
                          f"{float(e.total[t]):>10.4g}")


def run(args: argparse.Namespace) -> None:
    """Check the methods and read every image first (a bad input fails before the model
    loads), then explain."""
    methods = [m for spec in args.method for m in spec.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown method {unknown[0]!r}; the methods are: {', '.join(METHODS)}")
    check_writable(args.output)
    images = [(open_image(path), Path(path).name) for path in args.image]
    loaded = load(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)
    pictures = [prepare(image, name, loaded.preprocessing, loaded.name)
                for image, name in images]
    queries = queries_for(loaded, pictures, args.target, args.text)
    forms = (False, True) if args.compare else (not args.no_libra,)
    results = run_maps(loaded.model, queries, methods, forms, level=args.level,
                       tokenizer=loaded.tokenizer)
    _print_table(queries, results, methods, forms)
    title = f"{loaded.name}: {', '.join(methods)} ({', '.join(FORM_NAMES[f] for f in forms)})"
    path = save_grid(panels(queries, results, methods, forms), args.output, title=title,
                     scale=args.scale)
    print(f"wrote {path}")
