"""A compiled module survives pickle, torch.save/torch.load and deepcopy: the same forward, the
same (LibraGrad) gradients, its report, eval mode; across both frontends and a ModelOutput."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import timm
import torch
from torch import nn

from libragrad_fx import libra_transform
from tests.harness import perturb
from tests.hf_zoo import BY_NAME

pytestmark = pytest.mark.usefixtures("seeded")


def _saved(gm):
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {"pickle": lambda gm: pickle.loads(pickle.dumps(gm)), "torch.save": _saved,
               "deepcopy": copy.deepcopy}


class Sigmoidal(nn.Module):
    """A lone sigmoid: its Libra form keeps phi(0) = 0.5 as a buffer bias site."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


def _vit():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2, num_classes=5)
    return perturb(model), torch.randn(2, 3, 32, 32)


def _llama():
    entry = BY_NAME["llama"]
    model = entry.model("eager")
    return model, entry.example(model)


CASES = {"vit (fx)": (_vit, None), "sigmoid (fx)": (lambda: (Sigmoidal().eval(),
                                                             torch.randn(2, 6)), None),
         "llama (export, ModelOutput)": (_llama, "inputs_embeds")}


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _grad(gm, x):
    x = x.clone().requires_grad_(True)
    _logits(gm(x)).sum().backward()
    return x.grad


@pytest.mark.parametrize("trip", ROUND_TRIPS)
@pytest.mark.parametrize("case", CASES)
def test_the_round_trip_keeps_forward_gradients_report_and_eval(case, trip):
    build, keyword = CASES[case]
    model, x = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = libra_transform(model, example_inputs={keyword: x} if keyword else None)
    again = ROUND_TRIPS[trip](gm)
    assert type(again).__name__ == type(gm).__name__
    assert str(again.libra_report) == str(gm.libra_report)
    assert again.libra_report.complete
    assert not any(m.training for m in again.modules())
    with torch.no_grad():
        want, got = gm(x), again(x)
    assert type(got) is type(want)
    assert torch.equal(_logits(got), _logits(want))
    assert torch.equal(_grad(again, x), _grad(gm, x))
    vanilla = _grad(model, x) if keyword is None else None
    if vanilla is not None and case != "sigmoid (fx)":
        assert not torch.allclose(_grad(again, x), vanilla)  # still LibraGrad's backward


def test_a_compiled_module_is_in_eval_mode_and_the_model_is_untouched():
    model, _ = _vit()
    gm = libra_transform(model)
    assert not any(m.training for m in gm.modules())
    assert not any(m.training for m in model.modules())


def test_a_deep_copy_is_independent_of_the_original():
    model, x = _vit()
    gm = libra_transform(model)
    twin = copy.deepcopy(gm)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
        assert not torch.equal(twin(x), gm(x))
        assert torch.equal(gm(x), model(x))
