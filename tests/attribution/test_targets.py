"""Targets on any output: tensors, tuples, dicts; and a class index on a CLIP model refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from libragrad_fx import InputError, explain
from libragrad_fx.attribution.targets import batch_of, resolve

pytestmark = pytest.mark.usefixtures("seeded")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(torch.nn.functional.gelu(self.norm(x)))


class Tokens(nn.Module):
    """Patch tokens, two blocks, a head; the output in the form ``kind`` names."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.patch, self.blocks, self.head = nn.Conv2d(3, 8, 4, 4), nn.Sequential(
            Block(), Block()), nn.Linear(8, 5)

    def forward(self, x):
        tokens = self.blocks(self.patch(x).flatten(2).transpose(1, 2))
        logits = self.head(tokens.mean(1))
        if self.kind == "dict":
            return {"logits": logits, "hidden": tokens}
        if self.kind == "tuple":
            return logits, tokens
        return logits


X = torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_class_and_callable_targets_on_structured_outputs_equal_the_tensor_models(kind):
    plain = Tokens("tensor").eval()
    structured = Tokens(kind).eval()
    structured.load_state_dict(plain.state_dict())
    pick = (lambda o: o["logits"][:, 3]) if kind == "dict" else (lambda o: o[0][:, 3])
    expected = explain(plain, X, target=3, method="input_x_gradient")
    for target in (3, pick):
        got = explain(structured, X, target=target, method="input_x_gradient")
        assert torch.equal(got.score, expected.score)
        assert torch.allclose(got.token_map, expected.token_map)


def test_a_callable_on_a_dict_must_still_give_one_score_per_sample():
    model = Tokens("dict").eval()
    with pytest.raises(InputError, match=r"shape \(2,\); it returned \(2, 5\)"):
        explain(model, X, target=lambda o: o["logits"], method="input_x_gradient")


def test_batch_of_reads_the_first_tensor_of_any_structure():
    t = torch.zeros(3, 4)
    assert batch_of(t) == 3
    assert batch_of({"logits": t, "other": torch.zeros(5)}) == 3
    assert batch_of((None, t)) == 3
    assert batch_of(None) is None


class FakeClip(nn.Module):
    def encode_image(self, x):
        return x.flatten(1)[:, :4]

    def encode_text(self, tokens):
        return torch.ones(tokens.shape[0], 4)

    def forward(self, x):
        return self.encode_image(x)


def test_a_class_index_on_a_clip_model_is_refused_with_the_way_to_ask_for_a_coordinate():
    for target in (3, torch.tensor([3, 1])):
        with pytest.raises(InputError, match=r"is a CLIP model.*target=lambda e: e\[:, N\]"):
            resolve(target, FakeClip())
    chosen = resolve(lambda e: e[:, 3], FakeClip())
    assert torch.equal(chosen.score(torch.arange(8.0).reshape(2, 4), False),
                       torch.tensor([3.0, 7.0]))
