"""One map over an image: signed maps red/blue around 0, non-negative maps on a sequential scale.

A signed map (any value below 0) is painted with a diverging colormap, positive red and negative
blue, zero transparent. A map with no negative value (GradCAM, rollout, a norm) is painted with
a sequential colormap from transparent (0) to its peak, so that it is not a washed-out half of
the diverging one. ``peak`` is the magnitude drawn at full colour: the map's own largest
|value| by default, or one shared by several panels so that their magnitudes compare.
"""

from __future__ import annotations

import numpy as np

_DIM = 0.7  # the image under a map, darkened so that colours stand out on white strokes
_GAMMA = 0.7  # opacity = |v|^gamma: weak evidence shows, faintly
SIGNED, SEQUENTIAL = "RdBu_r", "inferno"


def as_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) in [0, 1] from a grey (H, W) or colour (H, W, 3) image."""
    image = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 3:
        return image
    raise ValueError(f"an image is (H, W) or (H, W, 3), got shape {image.shape}")


def is_signed(heat: np.ndarray) -> bool:
    """True when the map has a negative value: it needs the diverging colormap."""
    return bool(np.nanmin(heat) < 0) if np.size(heat) else False


def peak_of(heats: list[np.ndarray]) -> float:
    """The largest finite |value| over ``heats`` (0 when there is none)."""
    finite = [np.abs(h[np.isfinite(h)]) for h in heats]
    return max((float(f.max()) for f in finite if f.size), default=0.0)


def overlay(image: np.ndarray, heat: np.ndarray | None, *, peak: float | None = None,
            signed: bool | None = None) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1]: ``image`` ((H, W) grey or (H, W, 3) colour, in [0, 1]) with
    ``heat`` (H, W) painted over it, or just the image when ``heat`` is None.

    ``signed`` picks the colormap (by default: diverging when the map has a negative value);
    a shared ``peak`` keeps several panels on one scale.
    """
    from matplotlib import colormaps

    base = as_rgb(image)
    if heat is None:
        return base
    heat = np.asarray(heat, dtype=np.float64)
    if heat.shape != base.shape[:2]:
        raise ValueError(f"map {heat.shape} and image {base.shape[:2]} differ in size")
    peak = peak_of([heat]) if peak is None else peak
    v = np.clip(heat / peak, -1.0, 1.0) if peak > 0 and np.isfinite(peak) else np.zeros_like(heat)
    v = np.nan_to_num(v)
    if is_signed(heat) if signed is None else signed:
        # hue from the sign, at least half saturated: weak values fade out instead of whitening
        colour = colormaps[SIGNED](0.5 + 0.5 * np.sign(v) * (0.5 + 0.5 * np.abs(v)))[..., :3]
    else:
        colour = colormaps[SEQUENTIAL](0.25 + 0.75 * np.clip(v, 0.0, 1.0))[..., :3]
    alpha = (np.abs(v) ** _GAMMA)[..., None]
    return (1 - alpha) * base * _DIM + alpha * colour
