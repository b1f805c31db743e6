"""Model -> fx.GraphModule through torch.export, for models symbolic tracing cannot handle."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .errors import TraceError


def export_trace(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """Export ``model`` at ``example_inputs`` and express the graph in the canonical vocabulary."""
    raise TraceError("the torch.export frontend is not implemented yet")
