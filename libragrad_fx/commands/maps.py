"""Images × targets × methods × forms → explanations, with a progress bar, and their panels.

Shared by ``explain`` and ``demo``: one ``explain()`` call per image, method and form covers
all of that image's targets (a batch of copies), so the bar counts images × methods × forms.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..attribution import Explanation, explain
from ..loading.inputs import Picture
from ..pictures import Panel

FORM_NAMES = {False: "vanilla", True: "Libra"}


@dataclass(frozen=True)
class Query:
    """One image and what to explain in it: class indices or prompts, and their titles."""

    picture: Picture
    targets: Sequence[int] | Sequence[str]
    names: Sequence[str]


Key = tuple[int, str, bool]  # (query, method, libra)


def run_maps(model: nn.Module, queries: Sequence[Query], methods: Sequence[str],
             forms: Sequence[bool], *, level: str = "token",
             tokenizer: Callable | None = None) -> dict[Key, Explanation]:
    """Every (query, method, form)'s explanation; row i of each is the query's target i."""
    from tqdm import tqdm

    options = {} if tokenizer is None else {"tokenizer": tokenizer}
    results: dict[Key, Explanation] = {}
    total = len(queries) * len(methods) * len(forms)
    with tqdm(total=total, desc="explaining", unit="map", file=sys.stderr, disable=None,
              leave=False) as bar:
        for i, query in enumerate(queries):
            targets = list(query.targets)
            target = targets if isinstance(targets[0], str) else torch.tensor(targets)
            for method in methods:
                for libra in forms:
                    results[(i, method, libra)] = explain(
                        model, query.picture.x, target=target, method=method, libra=libra,
                        level=level, **options)
                    bar.update()
    return results


def panels(queries: Sequence[Query], results: dict[Key, Explanation], methods: Sequence[str],
           forms: Sequence[bool], label: str = "") -> list[list[Panel]]:
    """One row per (query, target): the image, then each method's map in each form."""
    rows = []
    for i, query in enumerate(queries):
        image = query.picture.image
        for t, name in enumerate(query.names):
            row = [Panel(image, None, f"{label or query.picture.name}\n{name}")]
            for method in methods:
                for libra in forms:
                    heat = results[(i, method, libra)].heatmap(image.shape[:2])[t]
                    row.append(Panel(image, heat.detach().float().numpy(),
                                     f"{method} · {FORM_NAMES[libra]}\n{name}"))
            rows.append(row)
    return rows
