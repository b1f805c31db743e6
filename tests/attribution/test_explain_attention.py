"""The attention methods of `explain` against an independent hook-based reference (DESIGN.md §4).

`explain` never asks the model for its attention probabilities: it recomputes A_l outside the
graph from the attention inputs (a fused SDPA kernel stays fused) and forms ∂f/∂A_l = ∂f/∂O_l·V_lᵀ
itself, under the vanilla and under the LibraGrad backward. This file checks that materialisation
on the ORIGINAL timm ViT, with fused attention on, against plain PyTorch and no libragrad_fx code:

* a deep copy runs the explicit-softmax path (`fused_attn=False`) and a forward hook on each
  `attn_drop` captures A_l; autograd gives ∂f/∂A_l directly (`retain_grad`), and block pre-hooks
  capture h_l and ∂f/∂h_l;
* the Libra copy adds hand-written hooks from the DESIGN §1 table (GELU → x·[Φ(x)]cst, LayerNorm
  with a constant variance) and makes `attn_drop` return a fresh leaf, which cuts the path through
  A while A still receives its gradient;
* attention, rollout, gradsam, genatt and attcat are then written out by hand from DESIGN §4 and
  compared with `explain(...).token_map` in both forms.

Also checked: the gradient-weighted maps change with the backward while attention and rollout do
not, and a model with no class token refuses a class-row method unless given `query='mean'`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import timm
import torch
from torch import Tensor, nn

import libragrad_fx
from libragrad_fx import explain
from tests.harness import perturb
from tests.hooks import KNOWN_LEAVES, assert_close_rel, gelu_hook, layernorm_hook

SEED = 0
BATCH = 2
TARGET = 5
FORWARD_TOL = 1e-5  # hooked copies vs the original model, relative to max |logit|
GRADIENT_METHODS = ("gradsam", "genatt", "attcat")
A_ONLY_METHODS = ("attention", "rollout")
METHODS = A_ONLY_METHODS + GRADIENT_METHODS


# --------------------------------------------------------------------------- models


def _vit(**kwargs) -> nn.Module:
    torch.manual_seed(SEED)
    return perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs), SEED)


def _input() -> Tensor:
    return torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(SEED + 1))


# ------------------------------------------------------------------ reference hooks


@dataclass
class Trace:
    """What one hooked forward-backward gave: per block, A_l, ∂f/∂A_l, h_l, ∂f/∂h_l."""

    logits: Tensor
    attn: list[Tensor] = field(default_factory=list)  # (B, heads, T, T)
    attn_grad: list[Tensor] = field(default_factory=list)
    h: list[Tensor] = field(default_factory=list)  # (B, T, C)
    h_grad: list[Tensor] = field(default_factory=list)


def _reference(model: nn.Module, x: Tensor, target: int, libra: bool) -> Trace:
    """Run a hooked deep copy of `model`; differentiate logit `target`, summed over the batch."""
    ref = copy.deepcopy(model)
    attn: list[Tensor] = []
    h: list[Tensor] = []

    def grab_attention(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if libra:  # [A]cst·V: a fresh leaf, so the path through A is cut but A.grad is ∂f/∂A
            a = output.detach().requires_grad_(True)
        else:
            a = output
            a.retain_grad()
        attn.append(a)
        return a

    def grab_block_input(module: nn.Module, args: tuple) -> None:
        args[0].retain_grad()
        h.append(args[0])

    for m in ref.modules():
        if not list(m.children()):
            assert isinstance(m, KNOWN_LEAVES), type(m).__name__
        if hasattr(m, "fused_attn") and hasattr(m, "attn_drop"):  # timm Attention
            m.fused_attn = False
            m.attn_drop.register_forward_hook(grab_attention)
        elif libra and isinstance(m, nn.GELU):
            m.register_forward_hook(gelu_hook)
        elif libra and isinstance(m, nn.LayerNorm):
            m.register_forward_hook(layernorm_hook)
    for block in ref.blocks:
        block.register_forward_pre_hook(grab_block_input)

    logits = ref(x)
    logits[:, target].sum().backward()
    assert len(attn) == len(h) == len(ref.blocks)
    return Trace(
        logits=logits.detach(),
        attn=[a.detach() for a in attn],
        attn_grad=[a.grad.detach() for a in attn],
        h=[t.detach() for t in h],
        h_grad=[t.grad.detach() for t in h],
    )


# ------------------------------------------------------------ the methods, by hand


def _row(matrix: Tensor, query: str) -> Tensor:
    """(B, T, T) -> (B, T): the class token's row (token 0) or the mean over query rows."""
    return matrix[:, 0] if query == "cls" else matrix.mean(1)


def _eye(a: Tensor) -> Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype).expand(a.shape[0], -1, -1)


def _positive_grad_attention(a: Tensor, grad: Tensor) -> Tensor:
    """mean_h ReLU(∂f/∂A ⊙ A), written as A ⊙ ReLU(∂f/∂A) (the same since A >= 0)."""
    return (a * torch.relu(grad)).mean(1)


def _hand_map(trace: Trace, method: str, query: str = "cls") -> Tensor:
    if method == "attention":  # last block, mean over heads
        return _row(trace.attn[-1].mean(1), query)
    if method == "rollout":  # Π_l (½I + ½Ā_l), the first block rightmost
        r = _eye(trace.attn[0])
        for a in trace.attn:
            r = torch.bmm(0.5 * _eye(a) + 0.5 * a.mean(1), r)
        return _row(r, query)
    if method == "genatt":  # R ← R + mean_h ReLU(∇A⊙A)·R from R = I; the map is R − I
        r = _eye(trace.attn[0])
        for a, g in zip(trace.attn, trace.attn_grad, strict=True):
            r = r + torch.bmm(_positive_grad_attention(a, g), r)
        return _row(r - _eye(r), query)
    if method == "gradsam":  # mean over layers and heads
        maps = [
            _positive_grad_attention(a, g) for a, g in zip(trace.attn, trace.attn_grad, strict=True)
        ]
        return _row(torch.stack(maps).mean(0), query)
    if method == "attcat":  # Σ_l Ā_l[row] ⊙ Σ_c h_l⊙g_l
        total = torch.zeros_like(trace.h[0][..., 0])
        for a, h, g in zip(trace.attn, trace.h, trace.h_grad, strict=True):
            total = total + _row(a.mean(1), query) * (h * g).sum(-1)
        return total
    raise AssertionError(method)


# ------------------------------------------------------------------------ fixtures


@dataclass
class Case:
    model: nn.Module  # the original model handed to explain: never hooked, fused attention on
    x: Tensor
    output: Tensor
    traces: dict[bool, Trace]  # libra -> reference trace
    explained: dict = field(default_factory=dict)

    def explain(self, method: str, libra: bool, **options):
        key = (method, libra, tuple(sorted(options.items())))
        if key not in self.explained:
            self.explained[key] = explain(
                self.model, self.x, target=TARGET, method=method, libra=libra, **options
            )
        return self.explained[key]


def _fused_flags(model: nn.Module) -> list[bool]:
    return [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]


def _case(**kwargs) -> Case:
    model = _vit(**kwargs)
    flags = _fused_flags(model)
    assert model.blocks[0].attn.fused_attn is True, "timm did not choose fused attention"
    assert flags and all(flags)
    x = _input()
    with torch.no_grad():
        output = model(x)
    traces = {libra: _reference(model, x, TARGET, libra) for libra in (False, True)}
    assert _fused_flags(model) == flags  # the references touched only their copies
    return Case(model=model, x=x, output=output, traces=traces)


@pytest.fixture(scope="module")
def vit() -> Case:
    return _case()


@pytest.fixture(scope="module")
def vit_no_cls() -> Case:
    case = _case(class_token=False, global_pool="avg")
    assert case.model.num_prefix_tokens == 0
    return case


def _relative_change(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


# ------------------------------------------------------------ reference self-checks


@pytest.mark.parametrize("libra", [False, True], ids=["vanilla", "libra"])
def test_reference_forward_unchanged(vit: Case, libra: bool) -> None:
    """The hooked copies compute the original model's logits (only the backward differs)."""
    scale = vit.output.abs().max().item()
    torch.testing.assert_close(
        vit.traces[libra].logits, vit.output, rtol=0, atol=FORWARD_TOL * scale
    )


def test_reference_attention(vit: Case) -> None:
    """Captured A_l are row-stochastic (B, heads, T, T) and equal in both forms; ∂f/∂A_l is not."""
    vanilla, libra = vit.traces[False], vit.traces[True]
    t = vit.model.patch_embed.num_patches + 1
    for layer, (a, a_libra) in enumerate(zip(vanilla.attn, libra.attn, strict=True)):
        assert a.shape == (BATCH, vit.model.blocks[layer].attn.num_heads, t, t)
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a[..., 0]))
        torch.testing.assert_close(a_libra, a, rtol=1e-5, atol=1e-6)
    for layer in range(len(vanilla.attn)):
        change = _relative_change(libra.attn_grad[layer], vanilla.attn_grad[layer])
        assert change > 1e-2, f"block {layer}: ∂f/∂A agrees in both forms ({change=:.2e})"


# ------------------------------------------------------------------ explain vs reference


@pytest.mark.parametrize("libra", [False, True], ids=["vanilla", "libra"])
@pytest.mark.parametrize("method", METHODS)
def test_token_map_matches_reference(vit: Case, method: str, libra: bool) -> None:
    result = vit.explain(method, libra)
    assert result.method == method and result.libra is libra
    assert result.prefix == 1
    expected = _hand_map(vit.traces[libra], method)
    assert_close_rel(result.token_map, expected, f"{method}/libra={libra} token_map")
    assert_close_rel(result.score, vit.output[:, TARGET], f"{method}/libra={libra} score")
    assert _fused_flags(vit.model) == [True] * len(vit.model.blocks)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_gradient_weighted_methods_change_with_the_backward(vit: Case, method: str) -> None:
    vanilla = vit.explain(method, False).token_map
    libra = vit.explain(method, True).token_map
    change = _relative_change(libra, vanilla)
    assert change > 1e-2, f"{method}: vanilla and Libra maps agree ({change=:.2e})"
    expected = _relative_change(
        _hand_map(vit.traces[True], method), _hand_map(vit.traces[False], method)
    )
    assert expected > 1e-2, f"{method}: the references agree ({expected=:.2e})"


@pytest.mark.parametrize("method", A_ONLY_METHODS)
def test_attention_only_methods_ignore_the_backward(vit: Case, method: str) -> None:
    vanilla = vit.explain(method, False).token_map
    libra = vit.explain(method, True).token_map
    # LibraGrad leaves the forward bit for bit as it was, so A (and these maps) are the same
    assert torch.equal(libra, vanilla), f"{method}: {_relative_change(libra, vanilla)=:.2e}"


# -------------------------------------------------------------------- no class token


@pytest.mark.parametrize("method", METHODS)
def test_no_class_token_needs_query_mean(vit_no_cls: Case, method: str) -> None:
    with pytest.raises(libragrad_fx.InputError, match=r"query='mean'"):
        explain(vit_no_cls.model, vit_no_cls.x, target=TARGET, method=method)


@pytest.mark.parametrize("libra", [False, True], ids=["vanilla", "libra"])
@pytest.mark.parametrize("method", METHODS)
def test_no_class_token_query_mean(vit_no_cls: Case, method: str, libra: bool) -> None:
    result = vit_no_cls.explain(method, libra, query="mean")
    assert result.prefix == 0
    expected = _hand_map(vit_no_cls.traces[libra], method, query="mean")
    assert expected.shape == (BATCH, vit_no_cls.model.patch_embed.num_patches)
    assert_close_rel(result.token_map, expected, f"no cls/{method}/libra={libra} token_map")


def test_query_mean_on_class_token_model(vit: Case) -> None:
    """`query='mean'` is honoured where a class token exists too (it is not the class row)."""
    for method in ("rollout", "genatt"):
        result = vit.explain(method, True, query="mean")
        expected = _hand_map(vit.traces[True], method, query="mean")
        assert_close_rel(result.token_map, expected, f"query=mean/{method} token_map")
        assert _relative_change(result.token_map, vit.explain(method, True).token_map) > 1e-3
