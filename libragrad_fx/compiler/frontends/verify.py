"""The exported graph, checked against the model at the example inputs, bit for bit.

torch.export records what one run does, and the graph is then rebuilt and canonicalised here;
a model whose run the recording misses (a loop that writes into a preallocated buffer through
views, a recurrence unrolled at trace time differently from eval) would give a graph that is
not the model. Every later promise (the certificate, the same forward) is about the graph, so
a graph that does not reproduce the model at the inputs it was traced on is refused here
rather than certified. The check costs one forward of each, without gradients; inputs are
cloned for both calls, since some models scale their input in place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from ...errors import TraceError


def _clones(values: Any) -> Any:
    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, values)


def _mismatch(want: Any, got: Any) -> str | None:
    """Why two outputs differ, or None when every tensor is equal (a cache left out)."""
    if isinstance(want, dict) and not isinstance(got, dict):
        return f"a {type(got).__name__} instead of a {type(want).__name__}"
    if isinstance(want, dict):
        want = {k: v for k, v in want.items() if v is not None and k != "past_key_values"}
        got = {k: v for k, v in got.items() if v is not None and k != "past_key_values"}
        if set(want) != set(got):
            return f"fields {sorted(got)} instead of {sorted(want)}"
    wanted, gotten = pytree.tree_leaves(want), pytree.tree_leaves(got)
    if len(wanted) != len(gotten):
        return f"{len(gotten)} output values instead of {len(wanted)}"
    for a, b in zip(wanted, gotten, strict=True):
        if isinstance(a, torch.Tensor) and not (isinstance(b, torch.Tensor) and a.shape == b.shape
                                                and torch.equal(a, b)):
            if isinstance(b, torch.Tensor) and a.shape == b.shape and a.is_floating_point():
                return f"values up to {float((a - b).abs().max()):.3g} apart"
            return "an output of another shape or kind"
    return None


def check_reproduces(model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """A TraceError unless ``gm`` on the example inputs gives ``model``'s outputs exactly
    (``kwargs`` as the trace ran them; the graph takes the inputs positionally)."""
    inputs = [*args, *kwargs.values()]
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in inputs):
        return  # no values to compare (the coverage sweep's static tier)
    with torch.no_grad():
        want = model(*_clones(args), **_clones(kwargs))
        got = gm(*[v for v in _clones(inputs) if isinstance(v, torch.Tensor)])
    why = _mismatch(want, got)
    if why is not None:
        raise TraceError(
            f"the torch.export graph of {type(model).__name__} does not reproduce the model at "
            f"the example inputs ({why}), so it cannot stand for the model: torch.export "
            "recorded a run that differs from eval (in-place writes into buffers, a "
            "recurrence). Transform the affected submodule separately, or report it as a "
            "libragrad_fx issue with the model's class and config")
