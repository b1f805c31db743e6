"""A grid of titled panels saved as one PNG of a size fixed by the grid's shape.

Rows are images and targets, columns methods and forms; the caller decides. The figure is
drawn without pyplot (no global state, no display needed) and placed by hand rather than with
``bbox_inches="tight"``, so that the PNG's size depends only on the number of rows and columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LibraError
from .overlay import overlay

CELL = (1.5, 1.85)  # inches per panel (width, height), the title included
HEADER, FOOTER = 0.5, 0.3  # inches above and below the panels
MIN_WIDTH = 4.5  # inches: room for the title and the legend above a narrow grid
DPI = 100
LEGEND = "red: positive, blue: negative; each map scaled to its own largest |value|"


@dataclass(frozen=True)
class Panel:
    """An image ``grey`` (H, W) in [0, 1], a signed ``heat`` map over it or None, a title."""

    grey: np.ndarray
    heat: np.ndarray | None
    title: str


def figure_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for a grid of ``rows`` × ``cols`` panels."""
    width = max(cols * CELL[0], MIN_WIDTH)
    return (round(width * DPI), round((rows * CELL[1] + HEADER + FOOTER) * DPI))


def check_writable(path: str | Path) -> Path:
    """Fail before the work, not after it, when the PNG cannot be written where asked."""
    path = Path(path)
    if not path.parent.is_dir():
        raise LibraError(f"cannot write {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise LibraError(f"cannot write {path}: it is a folder")
    return path


def save_grid(rows: list[list[Panel]], path: str | Path, *, title: str = "") -> Path:
    """Draw ``rows`` of panels (rows may be shorter than the longest) and write a PNG."""
    from matplotlib.figure import Figure

    if not rows or not any(rows):
        raise LibraError("nothing to draw")
    cols = max(len(row) for row in rows)
    width, height = figure_size(len(rows), cols)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.text(0.5, 1 - 0.5 * HEADER * DPI / height, title, ha="center", va="center",
             fontsize=10, wrap=True)
    fig.text(0.5, 0.5 * FOOTER * DPI / height, LEGEND, ha="center", va="center", fontsize=7,
             color="0.3", wrap=True)
    cell_w, cell_h = CELL[0] * DPI / width, CELL[1] * DPI / height
    left = 0.5 * (1 - cols * cell_w)  # centred when the figure is wider than the grid
    image_h = 0.78 * cell_h  # the rest of the cell is the title
    for r, row in enumerate(rows):
        top = 1 - (HEADER * DPI / height) - r * cell_h
        for c, panel in enumerate(row):
            box = [left + c * cell_w + 0.06 * cell_w, top - cell_h + 0.02 * cell_h, 0.88 * cell_w,
                   image_h]
            ax = fig.add_axes(box)
            ax.imshow(overlay(panel.grey, panel.heat), interpolation="nearest")
            ax.set_title(panel.title, fontsize=7, pad=3)
            ax.set_xticks([])
            ax.set_yticks([])
    path = Path(path)
    try:
        fig.savefig(path, dpi=DPI, format="png")
    except OSError as exc:
        raise LibraError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path
