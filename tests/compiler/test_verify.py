"""The export frontend refuses a graph that does not reproduce the model at the example inputs,
and models that scale their input in place are traced, run and measured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from libragrad_fx import TraceError, completeness_error, libra_transform
from libragrad_fx.compiler.frontends.export import export_trace
from libragrad_fx.compiler.frontends.verify import check_reproduces

pytestmark = pytest.mark.usefixtures("seeded")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)).eval()


def test_a_graph_of_another_model_is_refused_naming_the_gap():
    x = torch.randn(2, 4)
    model, other = _mlp(), _mlp()
    check_reproduces(model, export_trace(model, (x,)), (x,), {})  # its own graph passes
    with pytest.raises(TraceError, match=r"does not reproduce the model .*values up to"):
        check_reproduces(model, export_trace(other, (x,)), (x,), {})


class ScalesItsInput(nn.Module):
    """Scales its input in place before use, as some Hugging Face embeddings do."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = _mlp()

    def forward(self, x):
        x *= 2.0
        return self.mlp(x)


def test_a_model_that_scales_its_input_in_place_is_compiled_and_measured():
    model, x = ScalesItsInput().eval(), torch.randn(2, 4)
    gm = libra_transform(model, frontend="export", example_inputs=(x.clone(),))
    with torch.no_grad():
        assert torch.equal(gm(x.clone()), model(x.clone()))
    error = completeness_error(gm, x, 1).relative.max().item()
    assert error < 1e-6, error
    assert completeness_error(model, x.clone(), 1).relative.max().item() > 1e-3
