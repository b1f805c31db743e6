"""Images × targets × methods × forms → explanations, with a progress bar, and their panels.

Shared by ``explain`` and ``demo``: one ``explain()`` call per image, method and form covers
all of that image's targets (a batch of copies), so the bar counts images × methods × forms.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..attribution import Explanation, explain
from ..errors import InputError, LibraError
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
             tokenizer: Callable | None = None,
             options: Mapping[str, Mapping] | None = None) -> dict[Key, Explanation]:
    """Every (query, method, form)'s explanation; row i of each is the query's target i.

    Progress is a bar on a terminal, and a line per map otherwise (a log, a notebook, CI),
    so that a run of minutes never looks stalled.
    """
    from tqdm import tqdm

    common = {} if tokenizer is None else {"tokenizer": tokenizer}
    results: dict[Key, Explanation] = {}
    total = len(queries) * len(methods) * len(forms)
    lines = not sys.stderr.isatty()
    with tqdm(total=total, desc="explaining", unit="map", file=sys.stderr, disable=None,
              leave=False) as bar:
        for i, query in enumerate(queries):
            targets = list(query.targets)
            target = targets if isinstance(targets[0], str) else torch.tensor(targets)
            for method in methods:
                for libra in forms:
                    start = time.perf_counter()
                    results[(i, method, libra)] = _explain(
                        model, query.picture, target, method, libra, level,
                        {**common, **(options or {}).get(method, {})})
                    bar.update()
                    if lines:
                        print(f"libragrad-fx: [{len(results)}/{total}] {query.picture.name} "
                              f"{method} {FORM_NAMES[libra]} "
                              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return results


def could_not_run(picture, exc: Exception) -> InputError:
    """A failure of the model on a picture as one line, with the fix that usually applies."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return InputError(
        f"the model could not run on {picture.name} as given, shape "
        f"{tuple(picture.x.shape)}: {type(exc).__name__}: {reason[:300]}. If it takes a fixed "
        "input size, pass --size H W")


def _explain(model: nn.Module, picture, target, method: str, libra: bool, level: str,
             options: Mapping) -> Explanation:
    try:
        return explain(model, picture.x, target=target, method=method, libra=libra,
                       level=level, **options)
    except LibraError:
        raise
    except Exception as exc:
        raise could_not_run(picture, exc) from exc


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
