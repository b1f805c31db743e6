"""One signed map over a grey image: positive red, negative blue, zero transparent.

Each map is scaled symmetrically around 0 by its own largest magnitude, so the colours say
sign and relative strength within the map; magnitudes are not comparable between panels (the
score and the completeness numbers printed alongside are).
"""

from __future__ import annotations

import numpy as np

_DIM = 0.7  # the image under a map, darkened so that colours stand out on white strokes
_GAMMA = 0.7  # opacity = |v|^gamma: weak evidence shows, faintly


def overlay(grey: np.ndarray, heat: np.ndarray | None) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1]: ``grey`` (H, W) in [0, 1] with ``heat`` (H, W) painted over
    it (or just the image when ``heat`` is None)."""
    from matplotlib import colormaps

    base = np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=-1)
    if heat is None:
        return base
    heat = np.asarray(heat, dtype=np.float64)
    if heat.shape != grey.shape:
        raise ValueError(f"map {heat.shape} and image {grey.shape} differ in size")
    peak = float(np.abs(heat).max()) if heat.size else 0.0
    v = heat / peak if peak > 0 and np.isfinite(peak) else np.zeros_like(heat)
    # hue from the sign, at least half saturated: weak values fade out instead of whitening
    colour = colormaps["RdBu_r"](0.5 + 0.5 * np.sign(v) * (0.5 + 0.5 * np.abs(v)))[..., :3]
    alpha = (np.abs(v) ** _GAMMA)[..., None]
    return (1 - alpha) * base * _DIM + alpha * colour
