"""The one check every metric makes of a map: all of it finite.

A NaN or an infinity in a map (a backward that overflowed, a division by a zero norm) would
be ranked somewhere by argsort and give a finite, meaningless SRG or AP; it is refused.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import InputError


def finite_map(scores: Tensor, metric: str) -> Tensor:
    """``scores`` unchanged, or an InputError saying how many values are not finite."""
    bad = ~scores.isfinite()
    if bad.any():
        rows = bad.flatten(1).any(1).nonzero()[:, 0].tolist()
        raise InputError(
            f"{metric}: the map has {int(bad.sum())} NaN or infinite value(s) of "
            f"{scores.numel()}, in sample(s) {rows[:8]}; a metric of it would be meaningless. "
            "Check the explanation (a backward that overflowed in float16, a zero norm)")
    return scores
