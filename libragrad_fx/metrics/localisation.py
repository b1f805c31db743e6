"""Localisation (DESIGN §5): how well a map finds the object, and the right one of two.

Both take an ``Explanation`` (upsampled with ``heatmap`` to the mask's size) or any map; a map
of another size than the mask is upsampled bilinearly, as ``heatmap`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attribution import Explanation
from ..errors import InputError
from .checks import finite_map


def _at_mask_size(attribution: Tensor | Explanation, mask: Tensor, name: str,
                  metric: str) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dim() != 3:
        raise InputError(f"{name} must be a (B, H, W) tensor")
    size = tuple(mask.shape[-2:])
    if isinstance(attribution, Explanation):
        attribution = attribution.heatmap(size)
    if not isinstance(attribution, Tensor) or attribution.dim() != 3:
        raise InputError("the map must be an Explanation or a (B, H, W) tensor")
    if attribution.shape[0] != mask.shape[0]:
        raise InputError(f"{attribution.shape[0]} maps for {mask.shape[0]} masks")
    if tuple(attribution.shape[-2:]) != size:
        attribution = F.interpolate(attribution[:, None].float(), size=size, mode="bilinear",
                                    align_corners=False)[:, 0]
    return finite_map(attribution.detach(), metric)


def average_precision(attribution: Tensor | Explanation, mask: Tensor) -> Tensor:
    """(B,): the area under each image's precision-recall curve, the map's pixels ranked
    against the ground-truth ``mask`` (B, H, W).

    The step-wise definition of ``sklearn.metrics.average_precision_score``: AP = Σ_n
    (R_n − R_{n−1}) P_n over the distinct score values n, from the highest, so tied pixels
    enter together. An image with an empty mask has no recall and gets NaN (average with
    ``nanmean``). The map is taken as it is (signed); clamp it first to rank only positive
    evidence.
    """
    scores = _at_mask_size(attribution, mask, "mask", "average_precision").flatten(1).double()
    labels = mask.flatten(1).to(scores.device, torch.bool)
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranked = scores.gather(1, order)
    hits = labels.gather(1, order).double()
    true_positives = hits.cumsum(1)
    # the last position holding each position's score: where its tie group ends
    ascending = (-ranked).contiguous()
    end = torch.searchsorted(ascending, ascending, right=True) - 1
    precision = true_positives / torch.arange(1, scores.shape[1] + 1, device=scores.device,
                                              dtype=scores.dtype)
    positives = hits.sum(1)
    total = (hits * precision.gather(1, end)).sum(1)
    return torch.where(positives > 0, total / positives.clamp(min=1),
                       torch.full_like(total, float("nan"))).to(torch.float32)


def class_discrimination(attribution: Tensor | Explanation, query: Tensor,
                         other: Tensor) -> Tensor:
    """(B,): the share of positive attribution on the queried object, on images with two.

    share = Σ pos·query / (Σ pos·query + Σ pos·other), pos = the map clamped at 0 and
    ``query``/``other`` the two objects' masks (B, H, W). 1 puts all evidence on the queried
    object, 0 all on the other. When neither object gets any positive attribution the map
    prefers neither and the share is 0.5. Pixels in both masks count for both.
    """
    positive = _at_mask_size(attribution, query, "query", "class_discrimination")
    positive = positive.clamp(min=0).double()
    if not isinstance(other, Tensor) or other.shape != query.shape:
        raise InputError("other must be a mask of the same shape as query")
    on_query = (positive * query.to(positive)).sum((1, 2))
    on_other = (positive * other.to(positive)).sum((1, 2))
    both = on_query + on_other
    share = on_query / torch.where(both > 0, both, torch.ones_like(both))
    return torch.where(both > 0, share, torch.full_like(share, 0.5)).to(torch.float32)
