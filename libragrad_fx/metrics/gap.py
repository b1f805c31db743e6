"""How far an explanation's total is from what it should add up to (DESIGN §3, §5).

FullGrad-type maps (``fullgrad``, ``fullgrad+``) should sum, with the remainder, to the score
f(x); integrated gradients to f(x) − f(baseline). The gap measures the map itself, so it also
catches errors in the attribution code, not only in the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attribution import Explanation
from ..errors import InputError


def completeness_gap(explanation: Explanation, *, relative: bool = True) -> Tensor:
    """(B,): |token_map.sum + remainder − reference|, divided by |reference| when
    ``relative`` (by 1 where the reference is 0). The reference is score − baseline_score
    when the explanation has a baseline (integrated gradients), else the score."""
    if not isinstance(explanation, Explanation):
        raise InputError("completeness_gap takes an Explanation")
    reference = explanation.score
    if explanation.baseline_score is not None:
        reference = reference - explanation.baseline_score
    reference = reference.double()
    gap = (explanation.total.double() - reference).abs()
    if relative:
        scale = reference.abs()
        gap = gap / torch.where(scale > 0, scale, torch.ones_like(scale))
    return gap
