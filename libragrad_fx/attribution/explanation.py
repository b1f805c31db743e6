"""Explanation: the maps one method gives for a batch, and their picture-sized form."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LibraError
from .tokens import Layout


@dataclass(frozen=True)
class Explanation:
    """A batch of attributions.

    ``token_map`` (B, T) has a value for every token of the first block's input, prefix tokens
    (class, register, distillation) first, then the patches in raster order; ``patch_map`` is
    the patches on their (gh, gw) grid, or for a sequence with no grid (text) the tokens after
    the prefix, (B, T - prefix). ``remainder`` (B,) holds what belongs to no token (a
    head bias on a model without a class token), so for complete methods
    ``token_map.sum(-1) + remainder == score``. ``pixel_map`` (B, H, W) is set at pixel level.
    """

    token_map: Tensor
    patch_map: Tensor
    remainder: Tensor
    score: Tensor
    baseline_score: Tensor | None
    method: str
    libra: bool
    level: str = "token"
    prefix: int = 0
    pixel_map: Tensor | None = None

    @property
    def total(self) -> Tensor:
        """token_map.sum(-1) + remainder: what completeness compares with the score."""
        return self.token_map.sum(-1) + self.remainder

    def heatmap(self, size: tuple[int, int] | int) -> Tensor:
        """(B, H, W) at the image size: the pixel map, or the patch map upsampled bilinearly."""
        size = (size, size) if isinstance(size, int) else tuple(size)
        source = self.pixel_map if self.pixel_map is not None else self.patch_map
        if source.dim() != 3:
            raise LibraError("this explanation is of a sequence with no grid (a map per "
                             "token): there is no heatmap; read token_map")
        if tuple(source.shape[-2:]) == size:
            return source
        return F.interpolate(source[:, None].float(), size=size, mode="bilinear",
                             align_corners=False)[:, 0]

    def to(self, device: torch.device | str) -> Explanation:
        """The same explanation with every tensor on ``device``."""
        def move(t):
            return t.to(device) if isinstance(t, Tensor) else t
        return Explanation(move(self.token_map), move(self.patch_map), move(self.remainder),
                           move(self.score), move(self.baseline_score), self.method,
                           self.libra, self.level, self.prefix, move(self.pixel_map))


def to_explanation(layout: Layout, libra: bool, method: str, level: str, tokens: Tensor,
                   remainder: Tensor, score: Tensor, pixels: Tensor | None = None,
                   baseline_score: Tensor | None = None) -> Explanation:
    """The Explanation of a token map in ``layout``'s order: every method ends here, so the
    patch grid is cut and the maps are detached in one place."""
    patches = tokens[:, layout.prefix:]
    if layout.grid is not None:
        patches = patches.reshape(-1, *layout.grid)
    return Explanation(tokens.detach(), patches.detach(), remainder.detach(), score,
                       baseline_score, method, libra, level, layout.prefix,
                       None if pixels is None else pixels.detach())
