"""Handwritten digits on a canvas with exact masks, and small models trained on them.

Real images and trained weights for metrics that cannot use downloads (DESIGN.md §5, §6).
"""

from __future__ import annotations

from .data import DigitImages, make_digits, split_sources
from .models import CAPTIONS, NAMES, WeightsNotFoundError, build, load, tokenize_captions

__all__ = [
    "CAPTIONS",
    "NAMES",
    "DigitImages",
    "WeightsNotFoundError",
    "build",
    "load",
    "make_digits",
    "split_sources",
    "tokenize_captions",
]
