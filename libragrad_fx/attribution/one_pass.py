"""One-pass methods: one forward-backward run, then the method's formula on its readout.

A method's ``OnePass`` at each level says what the run must read and computes the map; the
runner here is the same for all of them, so a method is one record in the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from .engine import CompiledModel, Needs
from .explanation import Explanation, to_explanation
from .pixels import pool
from .targets import Target

if TYPE_CHECKING:
    from .registry import Method


@dataclass(frozen=True)
class OnePass:
    """A formula on one forward-backward run at one level, and what the run must read.

    ``compute`` maps the readout to (map, remainder (B,)): at token level it is called as
    ``compute(readout, layout, blocks, **options)`` and gives the token map (B, T); at pixel
    level as ``compute(readout, x, layout, blocks)`` and gives the pixel map (B, H, W).
    """

    needs: Callable[[int], Needs]  # from the number of blocks
    compute: Callable[..., tuple[Tensor, Tensor]]


def run_one_pass(method: Method, compiled: CompiledModel, x: Tensor, target: Target,
                 level: str, settings: Mapping[str, object]) -> Explanation:
    """``method`` on ``x`` from one run; only the method's own options reach its formula."""
    blocks = len(compiled.structure.inputs)
    layout = compiled.layout(x)
    if level == "pixel":
        readout = compiled.run(x, target, method.pixel.needs(blocks))
        pixels, rest = method.pixel.compute(readout, x, layout, blocks)
        tokens, outside = pool(pixels, layout)
        return to_explanation(layout, compiled.libra, method.name, level, tokens,
                              rest + outside, readout.score, pixels)
    readout = compiled.run(x, target, method.token.needs(blocks))
    own = {name: settings[name] for name in method.options}
    tokens, rest = method.token.compute(readout, layout, blocks, **own)
    return to_explanation(layout, compiled.libra, method.name, level, tokens, rest,
                          readout.score)
