"""End-to-end tests of libra_transform on real timm and open_clip architectures.

For each model (random weights, perturbed so that no output is exactly zero, eval mode):

1. the transformed forward is bit-identical to the model's;
2. its input gradient equals an independent reference of the LibraGrad rules, obtained by
   running the *original* model with hand-written LibraGrad versions of the nonlinear
   functionals patched in (no libragrad_fx code involved);
3. it is FullGrad-complete (DESIGN.md §3) while the original model is not;
4. the model itself is left untouched and shares its parameters with the result;
5. the rewrite report has the expected per-rule counts and is certified complete.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from unittest import mock

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import GluMlp, SwiGLU
from torch import Tensor, nn

from libragrad_fx import LibraWarning, libra_transform
from tests.harness import perturb
from tests.zoo import ClipTextFromEmbeddings, clip_tokens

BATCH = 2
TARGET = 3  # the output logit / feature whose gradient is explained
SEED = 0
GRAD_RTOL = 1e-4
COMPLETE_TOL = 1e-4  # relative completeness error of the transformed model (measured ~1e-6)
INCOMPLETE_TOL = 1e-2  # the original model must be at least this far from complete

# Parameters that enter additively (the bias set z_b of DESIGN.md §3), by their last name part,
# besides every name ending in "bias" (bias, in_proj_bias, q_bias, v_bias).
ADDITIVE = {"cls_token", "reg_token", "pos_embed", "class_embedding", "positional_embedding"}
# Parameters that enter multiplicatively (weights, LayerScale gamma, projection matrices).
MULTIPLICATIVE = {"weight", "in_proj_weight", "gamma", "proj", "text_projection"}

TIMM_MODELS: dict[str, dict] = {
    "vit_tiny_patch16_224": {},
    "deit3_small_patch16_224": {},
    "vit_small_patch14_reg4_dinov2": {"img_size": 112},
    "eva02_tiny_patch14_224": {},
    "mixer_s16_224": {},
    "gmixer_12_224": {},
}
CLIP_MODELS = ("open_clip_ViT-B-32_image", "open_clip_ViT-B-32_text")
MODELS = (*TIMM_MODELS, *CLIP_MODELS)

# Rewrites per rule, derived from each architecture:
# ViT-style (12 blocks): one attention and one GELU per block; norm1 + norm2 per block + the
# final norm. EVA02-Tiny: SiLU gate and SwiGLU product (GluMlp) per block, fc_norm instead of
# norm. Mixer-S/16 (8 blocks): GELU in the token and channel MLPs, 2 norms per block + final.
# gMixer-12: SiLU gate and GLU product in both MLPs of each block. CLIP image: ln_pre + 24 +
# ln_post; CLIP text: 24 + ln_final.
VIT_COUNTS = {"attention": 12, "gate": 12, "elementwise": 0, "norm": 25, "self_gating": 0}
EXPECTED_COUNTS: dict[str, dict[str, int]] = {
    "vit_tiny_patch16_224": VIT_COUNTS,
    "deit3_small_patch16_224": VIT_COUNTS,
    "vit_small_patch14_reg4_dinov2": VIT_COUNTS,
    "eva02_tiny_patch14_224": {"attention": 12, "gate": 12, "elementwise": 0,
                               "norm": 25, "self_gating": 12},
    "mixer_s16_224": {"attention": 0, "gate": 16, "elementwise": 0, "norm": 17, "self_gating": 0},
    "gmixer_12_224": {"attention": 0, "gate": 24, "elementwise": 0, "norm": 25, "self_gating": 24},
    "open_clip_ViT-B-32_image": {"attention": 12, "gate": 12, "elementwise": 0,
                                 "norm": 26, "self_gating": 0},
    "open_clip_ViT-B-32_text": {"attention": 12, "gate": 12, "elementwise": 0,
                                "norm": 25, "self_gating": 0},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run this module's large models on one intra-op thread, restored afterwards.

    On a small machine shared with other jobs, OpenMP's thread barriers turn every op into a
    wait for a time slice. Measured on 2 cores: 31s (two threads) and 43s (one) when idle, but
    about 6 minutes (two) against 40s (one) while another test run was going on. Bit-identity
    is compared at the same thread count either way.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- models --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_model() -> nn.Module:
    torch.manual_seed(SEED)
    return perturb(open_clip.create_model("ViT-B-32", pretrained=None), SEED).eval()


def build(name: str, request: pytest.FixtureRequest) -> tuple[nn.Module, Tensor]:
    """The perturbed eval-mode model and a fixed input batch for it."""
    gen = torch.Generator().manual_seed(SEED + 1)
    if name in TIMM_MODELS:
        torch.manual_seed(SEED)
        model = perturb(timm.create_model(name, pretrained=False, **TIMM_MODELS[name]), SEED).eval()
        size = TIMM_MODELS[name].get("img_size", 224)
        return model, torch.randn(BATCH, 3, size, size, generator=gen)
    clip = request.getfixturevalue("clip_model")
    if name.endswith("_image"):
        return clip.visual, torch.randn(BATCH, 3, 224, 224, generator=gen)
    tokens = clip_tokens(BATCH)
    text = ClipTextFromEmbeddings(clip, tokens).eval()
    with torch.no_grad():
        embeddings = clip.token_embedding(tokens)
    return text, embeddings


@dataclass
class Case:
    name: str
    model: nn.Module
    gm: nn.Module
    x: Tensor
    transform_warnings: list[warnings.WarningMessage]
    # taken before libra_transform was called
    params_before: list[tuple[str, nn.Parameter, int, Tensor]]
    buffers_before: list[tuple[str, Tensor, Tensor]]
    out_before: Tensor
    grad_before: Tensor


def input_grad(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(output, d sum_b out[b, TARGET] / dx) without touching any parameter's .grad."""
    out, (grad,) = gradients(fn, x, [])
    return out, grad


def gradients(fn: Callable[[Tensor], Tensor], x: Tensor,
              params: list[nn.Parameter]) -> tuple[Tensor, list[Tensor]]:
    """The output, and the gradients of sum_b out[b, TARGET] w.r.t. x and ``params``.

    torch.autograd.grad leaves every parameter's .grad alone; unused inputs get zeros.
    """
    x = x.clone().requires_grad_(True)
    out = fn(x)
    grads = torch.autograd.grad(out[:, TARGET].sum(), [x, *params], allow_unused=True)
    inputs = [x, *params]
    return out.detach(), [torch.zeros_like(t) if g is None else g
                          for t, g in zip(inputs, grads, strict=True)]


@pytest.fixture(scope="module", params=MODELS)
def case(request: pytest.FixtureRequest) -> Iterator[Case]:
    name = request.param
    model, x = build(name, request)
    params_before = [(n, p, p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()]
    buffers_before = [(n, b, b.clone()) for n, b in model.named_buffers()]
    out_before, grad_before = input_grad(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = libra_transform(model)
    yield Case(name, model, gm, x, list(caught), params_before, buffers_before, out_before,
               grad_before)


# --- the independent reference of the LibraGrad rules ----------------------------------------


def _gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """x * [Phi(x)]cst, Phi from erf (or the tanh approximation)."""
    x = input
    if approximate == "tanh":
        phi = 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    else:
        phi = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return x * phi.detach()


def _silu(input: Tensor, inplace: bool = False) -> Tensor:
    return input * torch.sigmoid(input).detach()


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5) -> Tensor:
    """(x - mu) / sqrt([var]cst + eps) * w + b; the mean-centring stays differentiable."""
    dims = tuple(range(-len(normalized_shape), 0))
    centred = input - input.mean(dims, keepdim=True)
    var = centred.pow(2).mean(dims, keepdim=True)
    y = centred / torch.sqrt(var.detach() + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """[softmax(q k^T * scale + mask)]cst @ v, with a boolean mask meaning 'keep' (SDPA)."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else scores + mask
    return torch.softmax(scores, dim=-1).detach() @ v


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False) -> Tensor:
    assert dropout_p == 0.0 and not enable_gqa
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    if is_causal:
        n, s = query.shape[-2], key.shape[-2]
        attn_mask = torch.ones(n, s, dtype=torch.bool).tril()
    return _attend(query, key, value, scale, attn_mask)


def _mha_forward(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                 need_weights=True, attn_mask=None, average_attn_weights=True,
                 is_causal=False) -> tuple[Tensor, None]:
    """nn.MultiheadAttention (packed in-projection) with constant attention probabilities."""
    assert key_padding_mask is None and not is_causal and self.bias_k is None
    if not self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    heads, dim = self.num_heads, self.embed_dim // self.num_heads
    w_q, w_k, w_v = self.in_proj_weight.chunk(3)
    b_q, b_k, b_v = self.in_proj_bias.chunk(3)

    def split(t: Tensor) -> Tensor:  # (B, L, E) -> (B, H, L, d)
        return t.unflatten(-1, (heads, dim)).transpose(1, 2)

    q, k, v = (split(F.linear(t, w, b)) for t, w, b in
               ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = ~attn_mask  # nn.MultiheadAttention: True means "do not attend"
    out = _attend(q, k, v, 1 / math.sqrt(dim), attn_mask).transpose(1, 2).flatten(2)
    out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
    return (out if self.batch_first else out.transpose(0, 1)), None


def _half_product(a: Tensor, b: Tensor) -> Tensor:
    """swap_backward(a*b, a*b/2): each factor gets half of the gradient."""
    p = a * b
    return p.detach() + 0.5 * (p - p.detach())


def _glu_mlp_forward(self: GluMlp, x: Tensor) -> Tensor:
    """timm.layers.GluMlp.forward with the product of the two branches shared."""
    x = self.fc1(x)
    x1, x2 = x.chunk(2, dim=self.chunk_dim)
    x = _half_product(x1, self.act(x2)) if self.gate_last else _half_product(self.act(x1), x2)
    return self.drop2(self.fc2(self.norm(self.drop1(x))))


def _swiglu_forward(self: SwiGLU, x: Tensor) -> Tensor:
    """timm.layers.SwiGLU.forward with the product of the two branches shared."""
    x = _half_product(self.act(self.fc1_g(x)), self.fc1_x(x))
    return self.drop2(self.fc2(self.norm(self.drop1(x))))


def _counted(counter: Counter, rule: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        counter[rule] += 1
        return fn(*args, **kwargs)

    return wrapper


@contextmanager
def libra_reference() -> Iterator[Counter]:
    """Patch in the hand-written LibraGrad functionals; yields calls counted per rule.

    timm and open_clip look these up at call time through ``torch.nn.functional`` (imported
    as ``F``) or call the patched module classes, so patching the attributes reaches them.
    """
    counter: Counter = Counter()
    patches = [
        (F, "scaled_dot_product_attention", "attention", _sdpa),
        (nn.MultiheadAttention, "forward", "attention", _mha_forward),
        (F, "gelu", "gate", _gelu),
        (F, "silu", "gate", _silu),
        (F, "layer_norm", "norm", _layer_norm),
        (GluMlp, "forward", "self_gating", _glu_mlp_forward),
        (SwiGLU, "forward", "self_gating", _swiglu_forward),
    ]
    with ExitStack() as stack:
        for owner, attr, rule, fn in patches:
            stack.enter_context(mock.patch.object(owner, attr, _counted(counter, rule, fn)))
        yield counter


def relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- completeness ----------------------------------------------------------------------------


def bias_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that enter additively; every parameter must be classified."""
    biases, unknown = [], []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.endswith("bias") or leaf in ADDITIVE:
            biases.append(p)
        elif leaf not in MULTIPLICATIVE:
            unknown.append(name)
    assert not unknown, f"parameters neither additive nor multiplicative: {unknown}"
    assert biases
    return biases


def completeness_errors(fn: Callable[[Tensor], Tensor], x: Tensor,
                        biases: list[nn.Parameter]) -> list[float]:
    """|f - sum x df/dx - sum_b b df/db| / |f| for f = out[i, TARGET], per sample i."""
    errors = []
    for i in range(x.shape[0]):
        xi = x.clone().requires_grad_(True)
        f = fn(xi)[i, TARGET]
        assert abs(f.item()) > 1e-4, "a zero target makes the relative error meaningless"
        grads = torch.autograd.grad(f, [xi, *biases], allow_unused=True)
        total = sum((t.double() * g.double()).sum()
                    for t, g in zip([xi, *biases], grads, strict=True) if g is not None)
        errors.append((abs(f.double() - total) / abs(f.double())).item())
    return errors


# --- the tests ----------------------------------------------------------------------------------


def test_forward_is_bit_identical(case: Case) -> None:
    assert torch.equal(case.model(case.x), case.gm(case.x))
    # with an input that requires grad (case.out_before was computed that way)
    x = case.x.clone().requires_grad_(True)
    assert torch.equal(case.gm(x).detach(), case.out_before)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_forward_is_bit_identical_without_autograd(case: Case, mode: str) -> None:
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        assert torch.equal(case.model(case.x), case.gm(case.x))


def test_input_gradient_matches_reference(case: Case) -> None:
    _, libra = input_grad(case.gm, case.x)
    with libra_reference():
        reference_out, reference = input_grad(case.model, case.x)
    # the reference only changes the backward
    torch.testing.assert_close(reference_out, case.out_before, rtol=1e-4, atol=1e-5)
    # ... and does change it, so comparing with it is not vacuous
    assert relative(case.grad_before, reference) > 1e-2
    assert relative(libra, reference) < GRAD_RTOL


def test_parameter_gradients_match_reference(case: Case) -> None:
    """Parameter gradients too (FullGrad's bias maps are built from them)."""
    names, params = zip(*case.model.named_parameters(), strict=True)
    _, (_, *libra) = gradients(case.gm, case.x, list(params))
    with libra_reference():
        _, (_, *reference) = gradients(case.model, case.x, list(params))
    # some gradients vanish in theory (a bias followed by a LayerNorm's mean-centring)
    floor = 1e-6 * max(g.norm() for g in reference)
    wrong = [n for n, a, b in zip(names, libra, reference, strict=True)
             if (a - b).norm() > GRAD_RTOL * b.norm() + floor]
    assert not wrong


def test_transformed_model_is_complete(case: Case) -> None:
    biases = bias_params(case.model)
    errors = completeness_errors(case.gm, case.x, biases)
    assert max(errors) < COMPLETE_TOL, errors


def test_original_model_is_not_complete(case: Case) -> None:
    errors = completeness_errors(case.model, case.x, bias_params(case.model))
    assert min(errors) > INCOMPLETE_TOL, errors


def test_model_is_unchanged_by_the_transform(case: Case) -> None:
    now = list(case.model.named_parameters())
    assert [n for n, _ in now] == [n for n, *_ in case.params_before]
    for (name, p), (_, p_before, ptr, value) in zip(now, case.params_before, strict=True):
        assert p is p_before and p.data_ptr() == ptr, name
        assert torch.equal(p, value), name
        assert p.grad is None, name
    buffers = list(case.model.named_buffers())
    assert [n for n, _ in buffers] == [n for n, _, _ in case.buffers_before]
    for (name, b), (_, b_before, value) in zip(buffers, case.buffers_before, strict=True):
        assert b is b_before and torch.equal(b, value), name
    out, grad = input_grad(case.model, case.x)
    assert torch.equal(out, case.out_before)
    assert torch.equal(grad, case.grad_before)


def test_parameters_are_shared(case: Case) -> None:
    model_params = {id(p): p for p in case.model.parameters()}
    gm_params = list(case.gm.parameters())
    assert gm_params
    assert {id(p) for p in gm_params} == set(model_params)
    assert {p.data_ptr() for p in gm_params} == {p.data_ptr() for p in model_params.values()}
    # a change to the model's parameters is seen by the transformed model
    bias = bias_params(case.model)[-1]
    saved = bias.detach().clone()
    with torch.no_grad():
        try:
            bias.add_(1.0)
            out = case.gm(case.x)
            assert not torch.equal(out, case.out_before)
            assert torch.equal(out, case.model(case.x))
        finally:
            bias.copy_(saved)


def test_report_counts(case: Case) -> None:
    report = case.gm.libra_report
    assert report.counts == EXPECTED_COUNTS[case.name]
    assert report.violations == []
    assert not [w for w in case.transform_warnings if issubclass(w.category, LibraWarning)]
    # the reference patched as many nonlinear sites per rule as the transform rewrote
    with libra_reference() as calls:
        case.model(case.x)
    assert {rule: calls[rule] for rule in report.counts} == report.counts


def test_clip_text_wrapper_matches_encode_text(clip_model: nn.Module) -> None:
    tokens = clip_tokens(BATCH)
    text = ClipTextFromEmbeddings(clip_model, tokens).eval()
    with torch.no_grad():
        expected = clip_model.encode_text(tokens)
        assert torch.equal(text(clip_model.token_embedding(tokens)), expected)
