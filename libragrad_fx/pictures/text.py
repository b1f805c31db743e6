"""A map over a token sequence, as text: each token's background coloured by its score.

For the terminal (24-bit ANSI colours), as an HTML page, or drawn as a picture (PNG, JPEG, PDF,
SVG). Signed scores are red (positive) and blue (negative) around white, as on the images; a
non-negative map goes from white to dark red; one peak for the whole sequence (the largest
|score|), or a given one so that several sequences compare.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import LibraError
from .grid import picture_format
from .overlay import SIGNED, is_signed, peak_of

TEXT_SEQUENTIAL = "Reds"


def token_colours(scores: Sequence[float], *, peak: float | None = None) -> np.ndarray:
    """(T, 3) RGB in [0, 1]: white at 0, full colour at ±peak (dark red for a non-negative
    map: text sits on white, where the images' sequential map would fade out)."""
    from matplotlib import colormaps

    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise LibraError(f"a token map is one score per token, got shape {values.shape}")
    peak = peak_of([values]) if peak is None else peak
    v = np.nan_to_num(np.clip(values / peak, -1, 1)) if peak > 0 else np.zeros_like(values)
    if is_signed(values):
        return colormaps[SIGNED](0.5 + 0.5 * v)[:, :3]
    return colormaps[TEXT_SEQUENTIAL](v)[:, :3]


def _check(tokens: Sequence[str], scores: Sequence[float]) -> None:
    if len(tokens) != len(scores):
        raise LibraError(f"{len(tokens)} tokens and {len(scores)} scores: one score per token")


def _ink(rgb: np.ndarray) -> str:
    """Black or white text, whichever reads on the background."""
    return "black" if float(rgb @ np.array([0.299, 0.587, 0.114])) > 0.55 else "white"


def ansi(tokens: Sequence[str], scores: Sequence[float], *, peak: float | None = None) -> str:
    """The tokens with 24-bit ANSI background colours, for a terminal."""
    _check(tokens, scores)
    out = []
    for token, rgb in zip(tokens, token_colours(scores, peak=peak), strict=True):
        r, g, b = (round(255 * c) for c in rgb)
        fg = "30" if _ink(rgb) == "black" else "97"
        out.append(f"\x1b[{fg};48;2;{r};{g};{b}m{token}\x1b[0m")
    return "".join(out)


def to_html(tokens: Sequence[str], scores: Sequence[float], *, peak: float | None = None,
            title: str = "") -> str:
    """A standalone HTML page: each token a span coloured by its score, the score on hover."""
    _check(tokens, scores)
    spans = []
    for token, score, rgb in zip(tokens, scores, token_colours(scores, peak=peak), strict=True):
        r, g, b = (round(255 * c) for c in rgb)
        spans.append(f'<span style="background:rgb({r},{g},{b});color:{_ink(rgb)};'
                     f'white-space:pre" title="{float(score):.4g}">{html.escape(token)}</span>')
    heading = f"<h3>{html.escape(title)}</h3>" if title else ""
    return ("<!doctype html><meta charset=\"utf-8\"><body style=\"font-family:monospace;"
            f"line-height:1.8\">{heading}<p>{''.join(spans)}</p></body>")


def save_text(tokens: Sequence[str], scores: Sequence[float], path: str | Path, *,
              peak: float | None = None, title: str = "") -> Path:
    """Write the coloured tokens: ``.html`` as a page, else drawn as a picture."""
    path = Path(path)
    if path.suffix.lower() in (".html", ".htm"):
        path.write_text(to_html(tokens, scores, peak=peak, title=title), encoding="utf-8")
        return path
    fmt = picture_format(path)
    _check(tokens, scores)
    from matplotlib.figure import Figure

    per_line, colours = 12, token_colours(scores, peak=peak)
    lines = max(1, -(-len(tokens) // per_line))
    fig = Figure(figsize=(9, 0.5 + 0.4 * lines), dpi=100)
    if title:
        fig.text(0.01, 0.98, title, va="top", fontsize=9)
    for i, (token, rgb) in enumerate(zip(tokens, colours, strict=True)):
        row, col = divmod(i, per_line)
        fig.text(0.01 + col / per_line * 0.98, 1 - (0.5 + 0.4 * (row + 0.5)) / (0.5 + 0.4 * lines),
                 token, fontsize=9, family="monospace", color=_ink(rgb),
                 bbox={"facecolor": tuple(rgb), "edgecolor": "none", "pad": 2})
    fig.savefig(path, format=fmt)
    return path
