"""completeness_error refuses, in one line each, inputs it cannot take gradients at; and
libra_transform refuses rules that are not Rule objects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from libragrad_fx import InputError, LibraError, completeness_error, libra_transform

pytestmark = pytest.mark.usefixtures("seeded")


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)).eval()


def _inference() -> torch.Tensor:
    with torch.inference_mode():
        return torch.randn(2, 4)


@pytest.mark.parametrize("x, says", [
    (torch.randn(2, 4).tolist(), "takes a batched input tensor; got a list"),
    (torch.tensor(1.0), "a batch dimension; got a tensor of shape ()"),
    (torch.randn(0, 4), "an empty batch"),
    (torch.empty(2, 4, device="meta"), "a meta tensor"),
    (torch.ones(2, 4, dtype=torch.long), "floating-point input"),
    (torch.randn(2, 4, dtype=torch.float64), "the input is torch.float64 but the model is "
                                             "torch.float32"),
    (torch.tensor([[1.0, float("nan"), 0.0, 1.0]]), "1 NaN or infinite value"),
])
def test_each_bad_input_is_one_line_naming_it(x, says):
    for model in (_model(), libra_transform(_model())):
        with pytest.raises(InputError, match=says.replace("(", r"\(").replace(")", r"\)")):
            completeness_error(model, x, 0)


def test_an_inference_mode_tensor_is_refused_with_the_way_out():
    with pytest.raises(InputError, match=r"inference_mode\(\).*outside inference mode"):
        completeness_error(libra_transform(_model()), _inference(), 0)


@pytest.mark.parametrize("target, says", [
    ("cat", "a class index .* or a callable on the output; got 'cat'"),
    (torch.tensor([0, 1, 2]), r"one class index per sample \(2 here\); got shape \(3,\)"),
    (torch.tensor([0.5, 1.0]), "one class index per sample"),
])
def test_a_target_that_cannot_be_scored_is_one_line(target, says):
    with pytest.raises(InputError, match=says):
        completeness_error(libra_transform(_model()), torch.randn(2, 4), target)


def test_a_target_per_sample_is_read_per_sample():
    gm = libra_transform(_model())
    x = torch.randn(2, 4)
    both = completeness_error(gm, x, torch.tensor([0, 2])).score
    assert torch.equal(both, torch.stack([completeness_error(gm, x[:1], 0).score[0],
                                          completeness_error(gm, x[1:], 2).score[0]]))


def test_rules_must_be_rule_objects():
    with pytest.raises(LibraError, match=r"rules takes Rule objects, got 'attention'.*libra\("):
        libra_transform(_model(), rules=["attention"])


def test_a_compiled_module_refuses_meta_and_empty_inputs_and_warns_on_nan():
    from libragrad_fx import LibraWarning

    model = _model()
    gm = libra_transform(model)
    with pytest.raises(InputError, match="a meta tensor"):
        gm(torch.empty(2, 4, device="meta"))
    with pytest.raises(InputError, match="an empty batch"):
        gm(torch.randn(0, 4))
    with pytest.warns(LibraWarning, match="NaN or infinite values"):
        gm(torch.tensor([[float("nan"), 0.0, 1.0, 2.0]]))
    with torch.inference_mode():  # a forward alone is fine there
        x = torch.randn(3, 4)
        assert torch.equal(gm(x), model(x))


def test_an_input_on_another_device_than_the_model_is_one_line():
    model = _model().to("meta")  # a device other than the input's, without a GPU
    with pytest.raises(InputError, match="the input is on cpu but the model is on meta"):
        completeness_error(model, torch.randn(2, 4), 0)
