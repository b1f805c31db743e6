"""Scores of one token map on the text task: token-level deletion curves (MIF, LIF, SRG) and
evidence-token AP. Tokens are removed by writing PAD (id 0, never a key nor a distractor) and
the model is read on the embeddings of the edited ids, so the Llama head always pools the last
position, as it does when explained (on ``inputs_embeds``)."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.text_task import PAD
from libragrad_fx.metrics import average_precision

FRACTIONS = tuple(i / 10 for i in range(10))


def target_probability(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,): softmax probability of each sequence's label."""
    with torch.no_grad():
        logits = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    return logits.softmax(-1).gather(1, labels[:, None])[:, 0]


def deletion_area(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                  token_map: torch.Tensor, most_first: bool) -> torch.Tensor:
    """(B,): trapezoid area over the fractions of the target probability, the top
    (``most_first``) or bottom round(r·T) tokens of the map replaced by PAD."""
    order = token_map.argsort(dim=1, descending=most_first, stable=True)
    curve = []
    for r in FRACTIONS:
        k = round(r * ids.shape[1])
        edited = ids.clone()
        edited.scatter_(1, order[:, :k], PAD)
        curve.append(target_probability(model, edited, labels))
    return torch.trapezoid(torch.stack(curve, 1), torch.tensor(FRACTIONS), dim=1)


def score_map(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, evidence: torch.Tensor,
              token_map: torch.Tensor) -> dict[str, float]:
    """mif, lif, srg (= lif − mif) and evidence_ap (the signed map ranked against the key)."""
    token_map = token_map.detach().double()
    mif = deletion_area(model, ids, labels, token_map, True).mean().item()
    lif = deletion_area(model, ids, labels, token_map, False).mean().item()
    ap = average_precision(token_map[:, None], evidence[:, None]).nanmean().item()
    return {"srg": lif - mif, "mif": mif, "lif": lif, "evidence_ap": ap}
