"""Hugging Face models through the frontend, as the user has them (tests/hf_zoo.py builds them).

Each model is called on ``inputs_embeds`` (text) or ``pixel_values`` (vision), eager and sdpa
where it has both: the compiled forward is the model's own bit for bit (same output type), the
certificate passes, and FullGrad-completeness holds numerically.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from libragrad_fx import (
    InputError,
    LibraError,
    TraceError,
    TransformBugError,
    completeness_error,
    embed_tokens,
    libra_transform,
)
from tests.hf_zoo import BY_NAME, CASES, CLIP_TEXT

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

@functools.cache
def compiled(name: str, attn: str, dtype: torch.dtype = torch.float32):
    """(model, example, compiled module), built once per case for all the tests below."""
    entry = BY_NAME[name]
    model = entry.model(attn, dtype)
    x = entry.example(model, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = libra_transform(model, example_inputs={entry.input_name: x})
    return model, x, gm


def score(out) -> torch.Tensor:
    """One logit per sample: class 2, or token 2 at the last position."""
    logits = out if isinstance(out, torch.Tensor) else out[0]
    return (logits[:, -1] if logits.dim() == 3 else logits.flatten(1))[:, 2].sum()


def _op(full: str) -> str:
    return full.replace("torch._ops.", "").replace(".default", "")


@pytest.mark.parametrize(("name", "attn"), CASES)
def test_forward_certificate_completeness(name: str, attn: str) -> None:
    model, x, gm = compiled(name, attn)
    entry = BY_NAME[name]
    with torch.no_grad():
        want, got = model(**{entry.input_name: x}), gm(x)
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    else:  # a ModelOutput: the same fields, bit for bit, less the key/value cache
        assert set(want.keys()) - set(got.keys()) <= {"past_key_values"}
        for key, value in got.items():
            assert torch.equal(value, want[key]), key
    assert gm.libra_report.complete, gm.libra_report.violations
    error = completeness_error(gm, x[:1], score).relative.max().item()
    assert error < 1e-4, error


def test_keyword_and_positional_calls_agree_and_no_cache_is_returned() -> None:
    """Batch 2: the batch dimension is symbolic (the vmap-built mask included)."""
    entry = BY_NAME["llama"]
    model = entry.model("eager")
    x = entry.example(model, batch=2)
    gm = libra_transform(model, example_inputs={"inputs_embeds": x})
    with torch.no_grad():
        by_keyword, by_position, want = gm(inputs_embeds=x), gm(x), model(inputs_embeds=x)
    assert torch.equal(by_keyword.logits, by_position.logits)
    assert torch.equal(by_position.logits, want.logits)
    with torch.no_grad():
        assert torch.equal(gm(x[1:]).logits, model(inputs_embeds=x[1:]).logits)
    assert by_keyword.past_key_values is None
    assert model.config.use_cache  # the trace ran without the cache; the config is untouched


# Models that cast to float32 by hand (RMSNorm's upcast, rotary tables): in float64 their
# forward is rounded to float32 there, so completeness stops at that rounding (see below).
FLOAT32_CASTS = {"llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3"}


@pytest.mark.parametrize(("name", "attn"), CASES)
def test_float64_is_complete_to_rounding(name: str, attn: str) -> None:
    model, x, gm = compiled(name, attn, torch.float64)
    assert gm.libra_report.complete, gm.libra_report.violations
    error = completeness_error(gm, x[:1], score).relative.max().item()
    if name in FLOAT32_CASTS:
        assert 1e-10 < error < 1e-5, error  # the float32 rounding, not a rule's gap
    else:
        assert error < 1e-10, error
    vanilla = completeness_error(model, x[:1], score, input_name=BY_NAME[name].input_name)
    assert vanilla.relative.item() > 1e-3  # the test has teeth: the model is not complete


def test_decoder_float64_floor_is_the_models_float32_casts() -> None:
    """RMSNorm upcasts to float32 by hand, which rounds a float64 forward to float32: no backward
    is complete beyond that rounding (~1e-7). With the casts made float64 on a copy of the graph
    (the forward then differs), the same rules are complete to float64 rounding."""
    model, x, gm = compiled("llama", "eager", torch.float64)
    as_is = completeness_error(gm, x[:1], score).relative.max().item()
    assert 1e-10 < as_is < 1e-5, as_is
    copy = libra_transform(model, example_inputs={"inputs_embeds": x})
    wide = 0
    for node in copy.graph.nodes:
        if node.op == "call_method" and node.target == "to" and torch.float32 in node.args:
            node.args = tuple(torch.float64 if a is torch.float32 else a for a in node.args)
            wide += 1
    copy.recompile()
    assert wide
    assert completeness_error(copy, x[:1], score).relative.max().item() < 1e-10
    with torch.no_grad():
        assert not torch.equal(copy(x).logits, model(inputs_embeds=x).logits)


def test_embed_tokens_feeds_the_model_as_its_ids_do() -> None:
    model, _, gm = compiled("gemma", "eager")  # Gemma scales its embeddings inside the forward
    ids = torch.tensor([[1, 5, 7, 2, 9]])  # the example's shape: gm was exported at batch 1
    e = embed_tokens(model, ids)
    assert not e.requires_grad and e.shape == (1, 5, model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(gm(e).logits, model(input_ids=ids).logits)


def test_completeness_error_takes_a_plain_model_by_keyword() -> None:
    model, x, gm = compiled("qwen2", "eager")
    with pytest.raises(InputError, match="callable"):  # (batch, tokens, vocabulary) logits
        completeness_error(gm, x[:1], 2)
    vanilla = completeness_error(model, x[:1], score, input_name="inputs_embeds").relative.item()
    libra = completeness_error(gm, x[:1], score).relative.item()
    assert vanilla > 1e-3 and libra < 1e-4, (vanilla, libra)


def test_a_model_without_the_keyword_is_told_so() -> None:
    model = CLIP_TEXT.model("eager")
    with pytest.raises(TraceError, match="takes no keyword 'inputs_embeds'.*input_ids"):
        libra_transform(model, example_inputs={"inputs_embeds": torch.randn(1, 5, 32)})


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_model_of_token_ids_only_is_explained_from_their_embeddings(attn, dtype) -> None:
    """CLIP's text tower pools at the end-of-text position found from the ids, and has no
    inputs_embeds: the graph is cut at its embedding lookup (the ids kept as constants)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # transformers builds CLIP's causal mask in the default dtype
    try:
        model = CLIP_TEXT.model(attn, dtype)
        ids = torch.tensor([[1, 5, 7, 2, 9]])
        gm = libra_transform(model, example_inputs={"input_ids": ids}, from_embeddings=True)
        e = embed_tokens(model, ids)
        with torch.no_grad():
            want, got = model(input_ids=ids), gm(e)
        assert type(got) is type(want)
        assert all(torch.equal(got[k], want[k]) for k in want.keys())
        assert gm.libra_report.complete, gm.libra_report.violations

        def pooled(o):
            return o.pooler_output[:, 3]

        error = completeness_error(gm, e, pooled).relative.item()
        assert error < (1e-4 if dtype == torch.float32 else 1e-10), error
        vanilla = libra_transform(model, rules=(), example_inputs={"input_ids": ids},
                                  from_embeddings=True)
        assert completeness_error(vanilla, e, pooled).relative.item() > 1e-3
    finally:
        torch.set_default_dtype(default)


def test_from_embeddings_needs_the_ids_alone() -> None:
    model = CLIP_TEXT.model("eager")
    with pytest.raises(LibraError, match="from_embeddings=True needs example_inputs="):
        libra_transform(model, example_inputs=(torch.randn(1, 5, 32),), from_embeddings=True)
    with pytest.raises(TraceError, match="one keyword, the token ids"):
        libra_transform(model, example_inputs={"inputs_embeds": torch.randn(1, 5, 32)},
                        from_embeddings=True)


def test_a_crash_inside_a_stage_is_reported_as_our_bug(monkeypatch) -> None:
    from libragrad_fx.compiler import transform

    def broken(gm, flow=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(transform, "certify", broken)
    model, x, _ = compiled("vit", "sdpa")
    with pytest.raises(TransformBugError, match="certification stage.*bug") as info:
        libra_transform(model, example_inputs={"pixel_values": x})
    assert isinstance(info.value.__cause__, RuntimeError)
