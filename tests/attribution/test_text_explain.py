"""explain on Hugging Face models as the user has them: a ViT with a class target on its
ModelOutput, a decoder and an encoder from token ids, with a map per token."""

from __future__ import annotations

import pytest
import torch

from libragrad_fx import InputError, explain, token_logit
from libragrad_fx.pictures import ansi
from tests.hf_zoo import BY_NAME

pytest.importorskip("transformers")
pytestmark = [pytest.mark.usefixtures("seeded"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
IDS = torch.tensor([[1, 5, 7, 2, 9]])


def _gap(e) -> float:
    return ((e.total - e.score).abs() / e.score.abs()).max().item()


def test_hf_vit_class_target_reads_its_model_output():
    entry = BY_NAME["vit"]
    model = entry.model("eager")
    x = entry.example(model)
    e = explain(model, x, target=1, method="fullgrad+")
    with torch.no_grad():
        assert torch.equal(e.score, model(pixel_values=x).logits[:, 1])
    assert e.patch_map.shape == (1, 4, 4) and _gap(e) < 1e-4


@pytest.mark.parametrize("target", [token_logit(3), lambda out: out.logits[:, -1, 3]])
def test_a_decoder_explained_from_token_ids_gets_a_map_per_token(target):
    model = BY_NAME["llama"].model("eager")
    libra = explain(model, input_ids=IDS, target=target, method="fullgrad+")
    vanilla = explain(model, input_ids=IDS, target=target, method="fullgrad+", libra=False)
    with torch.no_grad():
        assert torch.equal(libra.score, model(input_ids=IDS).logits[:, -1, 3])
    assert libra.token_map.shape == (1, IDS.shape[1])
    assert _gap(libra) < 1e-4 and _gap(vanilla) > 1e-3
    text = ansi([f" t{i}" for i in range(IDS.shape[1])], libra.token_map[0].tolist())
    assert text.count("\x1b[0m") == IDS.shape[1]


def test_an_encoder_explained_from_token_ids_with_a_class_target():
    model = BY_NAME["bert"].model("eager")
    e = explain(model, input_ids=IDS, target=1, method="input_x_gradient")
    with torch.no_grad():
        assert torch.equal(e.score, model(input_ids=IDS).logits[:, 1])
    assert e.token_map.shape == (1, IDS.shape[1])
    full = explain(model, input_ids=IDS, target=1, method="fullgrad+")
    assert _gap(full) < 1e-4


def test_x_and_input_ids_together_are_refused():
    model = BY_NAME["llama"].model("eager")
    with pytest.raises(InputError, match="x or input_ids, not both"):
        explain(model, torch.randn(1, 5, 32), input_ids=IDS, target=token_logit(3))
