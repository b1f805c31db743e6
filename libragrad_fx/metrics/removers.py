"""How token removal removes: drop or zero patch tokens in the first block's input and run the
graph's tail, or paint patches over in the image and run the whole model."""

from __future__ import annotations

import contextlib
import io

import torch
from torch import Tensor, nn

from ..attribution.stream import TokenStream
from ..errors import InputError


class CannotDrop(Exception):
    """The graph's tail does not run, or changes its output, on a shortened sequence."""


class TokenRemover:
    """Patch tokens removed from the first block's input h_0 of every image (zeroed or
    dropped), and the graph's tail run from there."""

    def __init__(self, stream: TokenStream, x: Tensor, grid: tuple[int, int] | None,
                 patches: int, size: int):
        if grid is not None and tuple(grid) != stream.grid:
            raise InputError(f"the map's {grid[0]}x{grid[1]} patches are not the model's "
                             f"{stream.grid[0]}x{stream.grid[1]} grid")
        self.positions = torch.tensor(stream.patch_positions, device=x.device)
        if len(self.positions) != patches:
            raise InputError(f"the map has {patches} patches, the model "
                             f"{stream.grid[0]}x{stream.grid[1]}")
        self.tokens, self.stream, self.x = stream.tokens, stream, x
        parts, shape = [], None
        for lo in range(0, x.shape[0], size):
            output, h0 = stream.first_input(x[lo:lo + size])
            parts.append(h0)
            shape = tuple(output.shape[1:])
        self.h0, self.shape = torch.cat(parts), shape

    def _removed(self, gone: Tensor) -> Tensor:
        """(N, P) patches -> (N, T) model token positions."""
        mask = gone.new_zeros(gone.shape[0], self.tokens)
        mask[:, self.positions] = gone
        return mask

    def zeroing(self, sample: Tensor, gone: Tensor) -> Tensor:
        stream = self.h0[sample].masked_fill(self._removed(gone)[..., None], 0)
        return self.stream.tail(self.x[sample], stream)

    def dropping(self, sample: Tensor, gone: Tensor) -> Tensor:
        mask = self._removed(gone)
        keep = self.tokens - int(mask[0].sum())
        kept = mask.to(torch.int8).argsort(dim=1, stable=True)[:, :keep]  # in model order
        stream = self.h0[sample]
        stream = stream.gather(1, kept[..., None].expand(-1, -1, stream.shape[-1]))
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # fx prints the failing line
                output = self.stream.tail(self.x[sample], stream)
        except Exception as exc:
            raise CannotDrop(f"the model fails on {keep} of {self.tokens} tokens: "
                              f"{str(exc).strip().splitlines()[-1]}") from exc
        if not isinstance(output, Tensor) or tuple(output.shape[1:]) != self.shape:
            got = tuple(output.shape[1:]) if isinstance(output, Tensor) else type(output)
            raise CannotDrop(f"on {keep} of {self.tokens} tokens the output per sample is "
                              f"{got}, not {self.shape}")
        return output


class PixelRemover:
    """Removed patches painted with ``fill``, and the whole model rerun."""

    def __init__(self, module: nn.Module, x: Tensor, grid: tuple[int, int] | None,
                 patches: int, fill: float | Tensor):
        side = round(patches ** 0.5)
        if grid is None and side * side == patches:
            grid = (side, side)
        if grid is None:
            raise InputError(f"pixel removal needs the patch grid of the {patches} patches: "
                             "pass a (B, gh, gw) map or grid=(gh, gw)")
        self.module, self.x, self.grid = module, x, grid
        try:
            self.fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device).expand_as(x)
        except RuntimeError as exc:
            raise InputError(f"fill does not broadcast to the images' {tuple(x.shape)}") from exc

    def __call__(self, sample: Tensor, gone: Tensor) -> Tensor:
        (gh, gw), (height, width) = self.grid, self.x.shape[-2:]
        ph, pw = height // gh, width // gw
        patches = gone.reshape(-1, gh, gw).repeat_interleave(ph, 1).repeat_interleave(pw, 2)
        mask = gone.new_zeros(gone.shape[0], height, width)
        mask[:, :gh * ph, :gw * pw] = patches
        images = torch.where(mask[:, None], self.fill[sample], self.x[sample])
        return self.module(images)
