"""A grid of titled panels saved as one picture of a size fixed by the grid's shape.

Rows are images and targets, columns methods and forms; the caller decides. The figure is
drawn without pyplot (no global state, no display needed) and placed by hand rather than with
``bbox_inches="tight"``, so that the picture's size depends only on the number of rows and
columns. The format follows the file name (PNG, JPEG, PDF, SVG).

``scale`` says which maps share a colour scale: each its own (``"panel"``, colours compare
within a map), each row (``"row"``: vanilla and Libra of one target side by side) or the whole
grid (``"grid"``). A shared scale is drawn as a colorbar right of its row or of the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LibraError
from .overlay import is_signed, overlay, peak_of

CELL = (1.5, 1.85)  # inches per panel (width, height), the title included
HEADER, FOOTER = 0.5, 0.3  # inches above and below the panels
COLORBAR = 0.7  # inches right of the panels for a shared scale's colorbar
MIN_WIDTH = 4.5  # inches: room for the title and the legend above a narrow grid
DPI = 100
SCALES = ("panel", "row", "grid")
FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}
_LEGENDS = {
    "panel": "each map scaled to its own largest |value|",
    "row": "one scale per row (colorbar at its right)",
    "grid": "one scale for every map (colorbar at the right)",
}


@dataclass(frozen=True)
class Panel:
    """An ``image`` (H, W) grey or (H, W, 3) colour in [0, 1], a map over it or None, a title."""

    image: np.ndarray
    heat: np.ndarray | None
    title: str


def figure_size(rows: int, cols: int, *, scale: str = "panel") -> tuple[int, int]:
    """(width, height) in pixels of the picture for a grid of ``rows`` × ``cols`` panels."""
    width = max(cols * CELL[0], MIN_WIDTH) + (COLORBAR if scale != "panel" else 0.0)
    return (round(width * DPI), round((rows * CELL[1] + HEADER + FOOTER) * DPI))


def picture_format(path: Path) -> str:
    """The picture format a file name asks for (its suffix), or a LibraError listing them."""
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise LibraError(f"cannot write {path}: the picture's format comes from the file name, "
                         f"and {path.suffix or 'no suffix'} is not one of "
                         f"{', '.join(FORMATS)}") from None


def check_writable(path: str | Path) -> Path:
    """Fail before the work, not after it, when the picture cannot be written where asked."""
    path = Path(path)
    if not path.parent.is_dir():
        raise LibraError(f"cannot write {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise LibraError(f"cannot write {path}: it is a folder")
    picture_format(path)
    return path


def shared_scales(rows: list[list[Panel]], scale: str) -> list[list[int]]:
    """The groups of row indices that share one scale: none, each row, or all rows."""
    if scale == "panel":
        return []
    return [list(range(len(rows)))] if scale == "grid" else [[r] for r in range(len(rows))]


def group_scale(rows: list[list[Panel]], group: list[int]) -> tuple[float, bool]:
    """(peak, signed) of the maps in the rows of ``group``: what their colours are scaled to."""
    heats = [p.heat for r in group for p in rows[r] if p.heat is not None]
    return peak_of(heats), any(is_signed(h) for h in heats)


def _colorbar(fig, box: list[float], peak: float, signed: bool) -> None:
    """The colours of ``overlay`` over white, from -peak (or 0) to +peak, with ticks."""
    low = -peak if signed else 0.0
    values = np.linspace(peak, low, 128)[:, None].repeat(4, axis=1)
    strip = overlay(np.ones(values.shape), values, peak=peak, signed=signed)
    ax = fig.add_axes(box)
    ax.imshow(strip, aspect="auto", extent=(0, 1, low, peak), interpolation="nearest")
    ax.set_xticks([])
    ax.yaxis.tick_right()
    ax.set_yticks([low, 0.0, peak] if signed else [0.0, peak])
    ax.set_yticklabels([f"{t:.3g}" for t in ax.get_yticks()], fontsize=6)


def save_grid(rows: list[list[Panel]], path: str | Path, *, title: str = "",
              scale: str = "panel") -> Path:
    """Draw ``rows`` of panels (rows may be shorter than the longest) and write the picture."""
    from matplotlib.figure import Figure

    if not rows or not any(rows):
        raise LibraError("nothing to draw")
    if scale not in SCALES:
        raise LibraError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    path = Path(path)
    fmt = picture_format(path)
    cols = max(len(row) for row in rows)
    width, height = figure_size(len(rows), cols, scale=scale)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.text(0.5, 1 - 0.5 * HEADER * DPI / height, title, ha="center", va="center",
             fontsize=10, wrap=True)
    cell_w, cell_h = CELL[0] * DPI / width, CELL[1] * DPI / height
    bar_w = (COLORBAR * DPI / width) if scale != "panel" else 0.0
    left = 0.5 * (1 - bar_w - cols * cell_w)  # centred when the figure is wider than the grid
    image_h = 0.78 * cell_h  # the rest of the cell is the title
    shared: dict[int, tuple[float, bool]] = {}
    signed_maps = False
    for group in shared_scales(rows, scale):
        shared.update({r: group_scale(rows, group) for r in group})
        signed_maps |= shared[group[0]][1]
        top = 1 - (HEADER * DPI / height) - group[0] * cell_h
        bottom = 1 - (HEADER * DPI / height) - (group[-1] + 1) * cell_h + 0.02 * cell_h
        if any(p.heat is not None for r in group for p in rows[r]):
            box = [left + cols * cell_w + 0.15 * bar_w, bottom, 0.2 * bar_w,
                   top - 0.22 * cell_h - bottom]
            _colorbar(fig, box, *shared[group[0]])
    for r, row in enumerate(rows):
        top = 1 - (HEADER * DPI / height) - r * cell_h
        for c, panel in enumerate(row):
            box = [left + c * cell_w + 0.06 * cell_w, top - cell_h + 0.02 * cell_h, 0.88 * cell_w,
                   image_h]
            ax = fig.add_axes(box)
            peak, signed = shared.get(r, (None, None))
            if panel.heat is not None and signed is None:
                signed_maps |= is_signed(panel.heat)
            ax.imshow(overlay(panel.image, panel.heat, peak=peak, signed=signed),
                      interpolation="nearest")
            ax.set_title(panel.title, fontsize=7, pad=3)
            ax.set_xticks([])
            ax.set_yticks([])
    colours = "red: positive, blue: negative" if signed_maps else "dark to bright: 0 to peak"
    fig.text(0.5, 0.5 * FOOTER * DPI / height, f"{colours}; {_LEGENDS[scale]}", ha="center",
             va="center", fontsize=7, color="0.3", wrap=True)
    try:
        fig.savefig(path, dpi=DPI, format=fmt)
    except OSError as exc:
        raise LibraError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path
