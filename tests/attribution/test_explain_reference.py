"""Token-level `explain` against an independent hook-based reference (DESIGN.md §1, §4).

`explain(..., method="input_x_gradient")` and `method="hirescam"` are Σ_c h⊙∂f/∂h at the input of
the first and of the last block. Here the same maps are computed on deep copies of the ORIGINAL
timm / open_clip models with plain PyTorch hooks and no libragrad_fx code:

* vanilla: pre-hooks capture the block inputs and `torch.autograd.grad` differentiates the logit;
* Libra: extra forward hooks, written by hand from the DESIGN §1 table, replace each GELU by
  x·[Φ(x)]cst, each LayerNorm by (x−μ)/√([σ²]cst+ε)·γ+β and each attention by [softmax]cst·V, so
  the forward value is unchanged and only the backward becomes LibraGrad's.

The reference checks itself (forward unchanged, Libra maps differ from vanilla ones, FullGrad
completeness holds for the Libra reference and fails for the vanilla model) so that a wrong
reference cannot silently agree with a wrong `explain`. Also checked: `score`, `patch_map`, and
that `explain` leaves the model it is given untouched.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from libragrad_fx import explain
from tests.harness import perturb
from tests.hooks import KNOWN_LEAVES, assert_close_rel, gelu_hook, layernorm_hook

SEED = 0
BATCH = 2
FORWARD_TOL = 1e-5  # Libra reference forward vs original model, relative to max |output|
COMPLETE_TOL = 1e-4  # relative FullGrad-completeness error of the Libra reference
# Parameters that enter additively besides every "*bias" (DESIGN §3).
ADDITIVE = {"cls_token", "reg_token", "pos_embed", "class_embedding", "positional_embedding"}


# --------------------------------------------------------------------------- models


def _timm_blocks(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return model.blocks[0], model.blocks[-1]


def _clip_blocks(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return model.transformer.resblocks[0], model.transformer.resblocks[-1]


def _vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False)


def _mixer() -> nn.Module:
    # 196 tokens; embed dim 512 and tokens-MLP hidden dim 0.5·512 = 256 both differ from 196.
    return timm.create_model("mixer_s16_224", pretrained=False)


def _clip() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model("ViT-B-32", pretrained=None).visual


# name -> (builder, block locator, target index, patch grid)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable, int, tuple[int, int]]] = {
    "vit_tiny": (_vit, _timm_blocks, 3, (14, 14)),
    "mixer_s16": (_mixer, _timm_blocks, 7, (14, 14)),
    "clip_vit_b32": (_clip, _clip_blocks, 11, (7, 7)),
}


# --------------------------------------------------------------------- Libra hooks


def _detach_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return output.detach()


def _mha_hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output):
    """Self-attention recomputed with constant softmax probabilities (gradient through V only)."""
    query, key, value = args[:3]
    assert query is key is value, "the reference handles self-attention only"
    assert kwargs.get("attn_mask") is None and kwargs.get("key_padding_mask") is None
    assert module.batch_first and module._qkv_same_embed_dim
    assert module.bias_k is None and module.bias_v is None and not module.add_zero_attn
    b, t, c = query.shape
    h = module.num_heads
    d = c // h
    q, k, v = F.linear(query, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (z.reshape(b, t, h, d).transpose(1, 2) for z in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
    out = (probs.detach() @ v).transpose(1, 2).reshape(b, t, c)
    return module.out_proj(out), None


def _libra_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.GELU):
            m.register_forward_hook(gelu_hook)
        elif isinstance(m, nn.LayerNorm):  # also open_clip's LayerNorm subclass
            m.register_forward_hook(layernorm_hook)
        elif isinstance(m, nn.MultiheadAttention):
            m.register_forward_hook(_mha_hook, with_kwargs=True)
        elif hasattr(m, "fused_attn") and hasattr(m, "attn_drop"):  # timm Attention
            # Explicit softmax; attn_drop (Dropout/Identity) is applied to the probabilities.
            m.fused_attn = False
            m.attn_drop.register_forward_hook(_detach_hook)
    return ref


# ---------------------------------------------------------------------- reference


def _reference(
    model: nn.Module, locate: Callable, x: Tensor, target: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(output, Σ_c h_0⊙∂f/∂h_0, Σ_c h_{L-1}⊙∂f/∂h_{L-1}) of `model` (hooks included)."""
    captured: list[Tensor] = []

    def grab(module: nn.Module, args: tuple) -> None:
        captured.append(args[0])

    first, last = locate(model)
    handles = [first.register_forward_pre_hook(grab), last.register_forward_pre_hook(grab)]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    h_first, h_last = captured
    assert h_first.dim() == 3 and h_first.shape[0] == x.shape[0]  # (B, T, C): batch first
    g_first, g_last = torch.autograd.grad(out[:, target].sum(), [h_first, h_last])
    return (
        out.detach(),
        (h_first * g_first).sum(-1).detach(),
        (h_last * g_last).sum(-1).detach(),
    )


def _completeness_error(model: nn.Module, x: Tensor, target: int) -> float:
    """max_b |f_b − x_b·∂f_b/∂x_b − Σ_bias b·∂f_b/∂b| / |f_b|, with the model's own backward."""
    named = [
        (n, p)
        for n, p in model.named_parameters()
        if n.endswith("bias") or n.rsplit(".", 1)[-1] in ADDITIVE
    ]
    worst = 0.0
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        f = model(xi)[0, target]
        grads = torch.autograd.grad(f, [xi] + [p for _, p in named])
        total = (xi * grads[0]).sum() + sum(
            (p * g).sum() for (_, p), g in zip(named, grads[1:], strict=True)
        )
        worst = max(worst, abs(f.item() - total.item()) / abs(f.item()))
    return worst


@dataclass
class Case:
    name: str
    model: nn.Module  # the model handed to explain (never hooked)
    x: Tensor
    target: int
    grid: tuple[int, int]
    output: Tensor
    maps: dict[bool, dict[str, Tensor]]  # libra -> method -> (B, T) reference map
    libra_output: Tensor
    libra_model: nn.Module
    vanilla_model: nn.Module
    before: dict = field(default_factory=dict)  # _snapshot of model before any explain call
    explained: dict = field(default_factory=dict)

    def explain(self, method: str, libra: bool):
        key = (method, libra)
        if key not in self.explained:
            self.explained[key] = explain(
                self.model, self.x, target=self.target, method=method, libra=libra
            )
        return self.explained[key]


@pytest.fixture(scope="module", params=list(MODELS))
def case(request) -> Case:
    name = request.param
    build, locate, target, grid = MODELS[name]
    torch.manual_seed(SEED)
    model = perturb(build(), SEED)
    for m in model.modules():
        if not list(m.children()):
            assert isinstance(m, KNOWN_LEAVES), f"{name}: unhandled leaf {type(m).__name__}"
    x = torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(SEED + 1))
    output = model(x).detach()  # grad mode on: MultiheadAttention's no-grad fast path differs
    vanilla_model = copy.deepcopy(model)
    libra_model = _libra_copy(model)
    out_v, first_v, last_v = _reference(vanilla_model, locate, x, target)
    out_l, first_l, last_l = _reference(libra_model, locate, x, target)
    torch.testing.assert_close(out_v, output, rtol=0, atol=0)
    return Case(
        name=name,
        model=model,
        x=x,
        target=target,
        grid=grid,
        output=output,
        maps={
            False: {"input_x_gradient": first_v, "hirescam": last_v},
            True: {"input_x_gradient": first_l, "hirescam": last_l},
        },
        libra_output=out_l,
        libra_model=libra_model,
        vanilla_model=vanilla_model,
        before=_snapshot(model),
    )


# ------------------------------------------------------------ reference self-checks


def test_reference_libra_forward_unchanged(case: Case) -> None:
    scale = case.output.abs().max().item()
    torch.testing.assert_close(case.libra_output, case.output, rtol=0, atol=FORWARD_TOL * scale)


@pytest.mark.parametrize("method", ["input_x_gradient", "hirescam"])
def test_reference_libra_differs_from_vanilla(case: Case, method: str) -> None:
    vanilla, libra = case.maps[False][method], case.maps[True][method]
    rel = (libra - vanilla).abs().max().item() / vanilla.abs().max().item()
    assert rel > 1e-2, f"{case.name}/{method}: Libra and vanilla references agree ({rel=:.2e})"


def test_reference_vanilla_is_plain_autograd(case: Case) -> None:
    """The captured-input maps equal Σ_c h⊙∇h from an independent retain_grad pass."""
    model = copy.deepcopy(case.model)
    first, _ = MODELS[case.name][1](model)
    stash: list[Tensor] = []

    def keep(module: nn.Module, args: tuple) -> None:
        args[0].retain_grad()
        stash.append(args[0])

    handle = first.register_forward_pre_hook(keep)
    model(case.x)[:, case.target].sum().backward()
    handle.remove()
    (h,) = stash
    assert_close_rel((h * h.grad).sum(-1), case.maps[False]["input_x_gradient"], "retain_grad")


def test_reference_libra_is_complete(case: Case) -> None:
    """The hand-hooked model is FullGrad-complete (DESIGN §3); the original one is not."""
    assert _completeness_error(case.libra_model, case.x, case.target) < COMPLETE_TOL
    assert _completeness_error(case.vanilla_model, case.x, case.target) > 1e-2


# ------------------------------------------------------------------ explain vs reference


@pytest.mark.parametrize("libra", [False, True], ids=["vanilla", "libra"])
@pytest.mark.parametrize("method", ["input_x_gradient", "hirescam"])
def test_token_map_matches_reference(case: Case, method: str, libra: bool) -> None:
    result = case.explain(method, libra)
    assert result.method == method and result.libra is libra
    expected = case.maps[libra][method]
    assert_close_rel(result.token_map, expected, f"{case.name}/{method}/libra={libra} token_map")
    gh, gw = case.grid
    n_prefix = expected.shape[1] - gh * gw
    assert getattr(result, "prefix", n_prefix) == n_prefix, f"{case.name}: prefix {result.prefix}"
    patches = expected[:, n_prefix:].reshape(BATCH, gh, gw)
    assert_close_rel(result.patch_map, patches, f"{case.name}/{method}/libra={libra} patch_map")


@pytest.mark.parametrize("libra", [False, True], ids=["vanilla", "libra"])
def test_score_is_model_output(case: Case, libra: bool) -> None:
    result = case.explain("input_x_gradient", libra)
    expected = case.output[:, case.target]
    assert_close_rel(result.score, expected, f"{case.name}/libra={libra} score")


def _hook_counts(model: nn.Module) -> dict[tuple[str, str], int]:
    """Number of registered hooks of every kind on every submodule (non-zero ones only)."""
    counts = {}
    for mod_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr.endswith("hooks") and isinstance(value, dict) and value:
                counts[mod_name, attr] = len(value)
    return counts


def _global_hook_count() -> int:
    from torch.nn.modules import module as module_mod

    return sum(
        len(value)
        for attr, value in vars(module_mod).items()
        if attr.startswith("_global") and isinstance(value, dict)
    )


def _fused_flags(model: nn.Module) -> dict[str, bool]:
    return {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")}


def _snapshot(model: nn.Module) -> dict:
    """Everything explain must leave as it was: tensors, flags, hooks, .grad."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": [n for n, p in model.named_parameters() if p.grad is not None],
        "fused_attn": _fused_flags(model),
        "training": model.training,
        "hooks": _hook_counts(model),
        "global_hooks": _global_hook_count(),
    }


def test_model_not_mutated(case: Case) -> None:
    for method in ("input_x_gradient", "hirescam"):
        for libra in (False, True):
            case.explain(method, libra)  # cached: normally already run by the tests above
    before, after = case.before, _snapshot(case.model)
    assert before["state"].keys() == after["state"].keys(), case.name
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"{case.name}: {k} changed"
    for key in ("requires_grad", "grads", "fused_attn", "training", "hooks", "global_hooks"):
        assert before[key] == after[key], f"{case.name}: {key} {before[key]} -> {after[key]}"
