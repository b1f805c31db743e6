"""``libragrad-fx explain``: maps of one or more images, methods and forms, as one picture."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..attribution import METHODS
from ..attribution.registry import REGISTRY
from ..errors import InputError
from ..loading.inputs import Picture, Preprocessing, open_image, prepare
from ..loading.models import LoadedModel, load
from ..pictures import check_writable, save_grid
from .maps import FORM_NAMES, Query, could_not_run, panels, run_maps

_PROMPT_CHARS = 28  # a prompt longer than this is cut in panel titles


def _quoted(text: str) -> str:
    short = text if len(text) <= _PROMPT_CHARS else text[:_PROMPT_CHARS - 1] + "…"
    return f"“{short}”"


def _class_queries(loaded: LoadedModel, pictures: Sequence[Picture],
                   targets: list[int] | None) -> list[Query]:
    """Class targets, checked against the model's output; by default the predicted class."""
    queries = []
    for picture in pictures:
        try:
            with torch.no_grad():
                out = loaded.model(picture.x)
        except Exception as exc:
            raise could_not_run(picture, exc) from exc
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


def input_size(size: list[int] | None) -> tuple[int, int] | None:
    """``--size``: H W, or N for N×N."""
    if size is None:
        return None
    if len(size) > 2 or min(size) < 1:
        raise InputError(f"--size takes H W or one N, positive, got {' '.join(map(str, size))}")
    return (size[0], size[-1])


def preprocessing(loaded: LoadedModel, args: argparse.Namespace) -> Preprocessing:
    """The model's own preprocessing with the command line's --size, --mean and --std, and a
    note where the model stated no normalisation and none was given."""
    prep = loaded.preprocessing
    if (size := input_size(args.size)) is not None:
        prep = replace(prep, size=size)
    if args.std is not None and args.mean is None:
        raise InputError("--std needs --mean")
    if args.mean is not None:
        prep = replace(prep, mean=tuple(args.mean), std=tuple(args.std or (1.0, 1.0, 1.0)),
                       stated=True)
    if not prep.stated:
        print(f"libragrad-fx: note: {loaded.name} states no input normalisation, so images are "
              "given as [0, 1] values; pass --mean and --std if it was trained on others",
              file=sys.stderr)
    if prep.size is None:
        print(f"libragrad-fx: note: {loaded.name} states no input size, so images are given at "
              "their own size; pass --size H W if it takes a fixed one", file=sys.stderr)
    return prep


def method_options(methods: Sequence[str], query: str | None) -> dict[str, dict]:
    """Each method's options from the command line: ``--query`` for those that take one."""
    takers = [m for m in methods if "query" in REGISTRY[m].options]
    if query is not None and not takers:
        raise InputError(f"--query serves the attention methods "
                         f"({', '.join(m for m in METHODS if 'query' in REGISTRY[m].options)}); "
                         f"none of {', '.join(methods)} takes it")
    return {m: ({"query": query} if query is not None and m in takers else {}) for m in methods}


def run(args: argparse.Namespace) -> None:
    """Check the methods and read every image first (a bad input fails before the model
    loads), then explain."""
    methods = [m for spec in args.method for m in spec.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown method {unknown[0]!r}; the methods are: {', '.join(METHODS)}")
    check_writable(args.output)
    images = [(open_image(path), Path(path).name) for path in args.image]
    options = method_options(methods, args.query)
    input_size(args.size)
    loaded = load(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)
    if loaded.random_weights:
        print(f"libragrad-fx: note: {loaded.name} has random weights (no --pretrained or "
              "--checkpoint): the maps show what the method does, not what a trained model "
              "has learnt", file=sys.stderr)
    prep = preprocessing(loaded, args)
    pictures = [prepare(image, name, prep, loaded.name) for image, name in images]
    queries = queries_for(loaded, pictures, args.target, args.text)
    forms = (False, True) if args.compare else (not args.no_libra,)
    results = run_maps(loaded.model, queries, methods, forms, level=args.level,
                       tokenizer=loaded.tokenizer, options=options)
    _print_table(queries, results, methods, forms)
    title = f"{loaded.name}: {', '.join(methods)} ({', '.join(FORM_NAMES[f] for f in forms)})"
    path = save_grid(panels(queries, results, methods, forms), args.output, title=title,
                     scale=args.scale)
    print(f"wrote {path}")
