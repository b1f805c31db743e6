"""What libra_transform refuses, warns about and reports, and what it leaves alone.

Each error test checks the exception type from libragrad_fx.errors and that the message names
what was wrong and what to do about it. The report's JSON and table are tested in
tests/compiler/test_report.py, the ``report`` command in tests/commands/test_report.py (which
names AtanNet and D here by import path).
"""

from __future__ import annotations

import re
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from libragrad_fx import (
    InputError,
    LibraError,
    LibraWarning,
    TraceError,
    TrainingModeError,
    UncertifiedError,
    libra_transform,
)
from tests.harness import completeness_gap

D = 8


pytestmark = pytest.mark.usefixtures("seeded")  # torch.manual_seed(0) before each test


def completeness_error(fn, x: torch.Tensor, model: nn.Module) -> float:
    """|f - x df/dx - sum_b b df/db| / |f| for one sample, f the sum of the outputs."""
    bias = [p for name, p in model.named_parameters() if name.endswith("bias")]
    x = x.detach().clone().requires_grad_(True)
    return completeness_gap(fn(x).sum(), x, bias)


# --- TraceError --------------------------------------------------------------------------------


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.branch = Branchy()

    def forward(self, x):
        return self.branch(self.fc(x))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Inner()
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        return self.head(self.block(x))


def test_untraceable_submodule_raises_trace_error_naming_it():
    with pytest.raises(TraceError) as info:
        libra_transform(Outer().eval())
    message = str(info.value)
    assert "block.branch" in message
    assert "Branchy" in message
    assert "control flow" in message and "rewrite" in message  # what to do
    assert info.value.__cause__ is not None  # the tracer's own error is chained


def test_untraceable_root_raises_trace_error_naming_the_root():
    with pytest.raises(TraceError, match=r"<root> \(Branchy\)"):
        libra_transform(Branchy().eval())


def test_non_module_is_refused():
    with pytest.raises(LibraError, match="expects a torch.nn.Module, got function"):
        libra_transform(lambda x: x)


# --- an op no rule covers ----------------------------------------------------------------------


class AtanBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return torch.atan(self.fc(x))


class AtanNet(nn.Module):
    """Linear -> atan -> Linear: atan is on the gradient path and no rule covers it."""

    def __init__(self):
        super().__init__()
        self.body = AtanBody()
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_uncovered_op_warns_lists_it_and_still_runs():
    model = AtanNet().eval()
    with pytest.warns(LibraWarning) as record:
        gm = libra_transform(model)
    report = gm.libra_report
    (violation,) = report.violations
    assert "atan" in violation.op
    assert violation.module == "body"
    warned = " ".join(str(w.message) for w in record if issubclass(w.category, LibraWarning))
    assert violation.node in warned and "body" in warned

    text = str(report)
    (row,) = [line for line in text.splitlines() if line.startswith(violation.node + " ")]
    assert "body" in row and violation.op in row
    assert "NOT certified complete: 1 violation(s)" in text
    assert report.complete is False

    x = torch.randn(3, D)
    assert torch.equal(model(x), gm(x))
    assert report.counts == {"attention": 0, "gate": 0, "elementwise": 0, "norm": 0,
                             "self_gating": 0}


def test_uncovered_op_in_strict_mode_raises_uncertified_error_naming_the_node():
    model = AtanNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LibraWarning)
        node = libra_transform(model).libra_report.violations[0].node
    with pytest.raises(UncertifiedError) as info:
        libra_transform(model, strict=True)
    message = str(info.value)
    assert node in message and "atan" in message and "body" in message
    assert "strict=True" in message  # what to do: drop strict, or add a rule


class Activated(nn.Module):
    """Linear -> act -> Linear, for an activation that breaks completeness."""

    def __init__(self, act):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, D), nn.Linear(D, 2)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _square(x):
    return torch.square(x)


def _reciprocal(x):
    return 1 / x


def _softmax_dtype(x):
    return F.softmax(x, dim=-1, dtype=torch.float32)


@pytest.mark.parametrize(
    "act",
    [
        pytest.param(torch.exp, id="exp"),
        pytest.param(_square, id="square"),
        pytest.param(torch.sinh, id="sinh"),
        pytest.param(torch.atan, id="atan"),
        pytest.param(_reciprocal, id="1/x"),
        pytest.param(_softmax_dtype, id="F.softmax-dtype"),
    ],
)
def test_strict_mode_refuses_every_op_that_breaks_completeness(act):
    model = Activated(act).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LibraWarning)
        gm = libra_transform(model)
    x = torch.randn(1, D)
    assert completeness_error(gm, x, model) > 1e-3, "the op does break completeness"
    with pytest.raises(UncertifiedError):
        libra_transform(model, strict=True)


# --- training mode -----------------------------------------------------------------------------


def test_training_mode_is_refused_and_left_as_it_is():
    model = AtanNet().train()
    with pytest.raises(TrainingModeError) as info:
        libra_transform(model)
    assert "model.eval()" in str(info.value)
    assert "AtanNet" in str(info.value) and "training mode" in str(info.value)
    assert all(m.training for m in model.modules()), "the model must not be switched to eval"


def test_one_submodule_in_training_mode_is_named():
    model = AtanNet().eval()
    model.head.train()
    with pytest.raises(TrainingModeError, match="'head'"):
        libra_transform(model)
    assert model.head.training and not model.body.training


# --- inputs at call time -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_tiny():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    return model, libra_transform(model, strict=True)


def test_wrong_input_shape_raises_input_error_with_the_shape(vit_tiny):
    _, gm = vit_tiny
    with pytest.raises(InputError) as info:
        gm(torch.randn(1, 3, 200, 200))
    message = str(info.value)
    assert "(1, 3, 200, 200)" in message
    assert "VisionTransformer" in message
    assert "Pass the input the original model accepts" in message
    assert "Proxy" not in message
    assert info.value.__cause__ is not None


def test_missing_input_raises_input_error(vit_tiny):
    _, gm = vit_tiny
    with pytest.raises(InputError, match="expects an input tensor"):
        gm()


def test_wrong_rank_on_a_small_model_raises_input_error():
    model = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 2)).eval()
    gm = libra_transform(model, strict=True)
    with pytest.raises(InputError, match=re.escape("tensor of shape (3, 5)")):
        gm(torch.randn(3, 5))


# --- the model is left alone -------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True, dropout=0.1)
        self.drop = nn.Dropout(0.1)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Identity(),
                                 nn.Linear(2 * D, D))
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        h = self.norm(x)
        x = x + self.drop(self.attn(h, h, h, need_weights=False)[0])
        return x + self.scale * self.mlp(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _snapshot(model: nn.Module) -> dict:
    x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    out = model(x)
    grads = torch.autograd.grad(out.sum(), [x, *model.parameters()], allow_unused=True)
    return {
        "modules": [(name, id(m), type(m), m.training) for name, m in model.named_modules()],
        "children": {name: list(m._modules) for name, m in model.named_modules()},
        "params": [(name, id(p), p.detach().clone(), p.requires_grad)
                   for name, p in model.named_parameters()],
        "buffers": [(name, id(b), b.clone()) for name, b in model.named_buffers()],
        "instance_attrs": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "output": out.detach(),
        "grads": [torch.zeros(0) if g is None else g.clone() for g in grads],
    }


def _assert_same(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"]
    assert after["children"] == before["children"]
    assert after["instance_attrs"] == before["instance_attrs"]
    for (n0, i0, v0, r0), (n1, i1, v1, r1) in zip(before["params"], after["params"], strict=True):
        assert (n1, i1, r1) == (n0, i0, r0) and torch.equal(v1, v0), n0
    for (n0, i0, v0), (n1, i1, v1) in zip(before["buffers"], after["buffers"], strict=True):
        assert (n1, i1) == (n0, i0) and torch.equal(v1, v0), n0
    assert torch.equal(after["output"], before["output"])
    for g0, g1 in zip(before["grads"], after["grads"], strict=True):
        assert torch.equal(g1, g0)


def test_transform_does_not_mutate_the_model():
    model = Net().eval()
    before = _snapshot(model)
    gm = libra_transform(model, strict=True)
    _assert_same(before, _snapshot(model))

    # running the rewritten graph, forward and backward, leaves the model alone too
    x = torch.randn(2, 4, D, requires_grad=True)
    gm(x).sum().backward()
    _assert_same(before, _snapshot(model))
    assert gm.libra_report.counts == {"attention": 2, "gate": 2, "elementwise": 0, "norm": 2,
                                      "self_gating": 0}


def test_transformed_graph_shares_the_parameters():
    model = Net().eval()
    gm = libra_transform(model, strict=True)
    model_params = dict(model.named_parameters())
    shared = dict(gm.named_parameters())
    assert shared, "the graph must hold parameters"
    for name, p in shared.items():
        assert p is model_params[name], name
    assert set(model_params) - set(shared) == {"unused.weight", "unused.bias"}

    x = torch.randn(2, 4, D)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    assert torch.equal(gm(x), model(x))


class CachingAttentionBias(nn.Module):
    """Caches a tensor computed from a parameter in its forward, as some timm models do."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(4))
        self.cache: dict[str, torch.Tensor] = {}
        self.calls = 0

    def forward(self, x):
        if "bias" not in self.cache:
            self.cache["bias"] = self.table * 2
        self.calls += 1
        return x + self.cache["bias"]


def test_tracing_leaves_a_caching_model_as_it_was():
    model = CachingAttentionBias().eval()
    first = libra_transform(model)
    second = libra_transform(model)  # a proxy left in the cache would break this trace
    assert model.cache == {} and model.calls == 0
    x = torch.randn(2, 4)
    assert torch.equal(first(x), model(x)) and torch.equal(second(x), model(x))
