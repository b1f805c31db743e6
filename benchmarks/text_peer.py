"""The peer row of the text benchmark: LXT 2.1's AttnLRP on the same models and sequences.
LXT patches transformers' classes for the whole process, so this runs in its own process
(``python -m benchmarks.text_faithfulness --peer-only``)."""

from __future__ import annotations

import time

import torch

from benchmarks.text_scoring import score_map
from benchmarks.text_task import NAMES, load_text_model


def _patch() -> None:
    import transformers.models.bert.modeling_bert as modeling_bert
    import transformers.models.llama.modeling_llama as modeling_llama
    from lxt.efficient import monkey_patch
    from lxt.efficient.models.bert import attnLRP as bert_lrp
    from lxt.efficient.models.llama import attnLRP as llama_lrp

    monkey_patch(modeling_bert, bert_lrp)
    monkey_patch(modeling_llama, llama_lrp)


def attnlrp(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(relevance (B, T), target logit (B,)): the LXT recipe, embeddings × their gradient of
    the target logit, summed over features."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logit = model(inputs_embeds=embeds).logits.gather(1, labels[:, None])[:, 0]
    logit.sum().backward()
    return (embeds * embeds.grad).sum(-1).detach(), logit.detach()


def peer_rows(ids: torch.Tensor, labels: torch.Tensor, evidence: torch.Tensor
              ) -> dict[str, dict[str, float | str]]:
    """model name -> AttnLRP's metrics, or {"reason": ...} where LXT could not run it."""
    try:
        _patch()
    except Exception as exc:  # LXT missing or not matching this transformers
        return {name: {"reason": f"LXT could not patch: {type(exc).__name__}: {exc}"}
                for name in NAMES}
    rows: dict[str, dict[str, float | str]] = {}
    for name in NAMES:
        try:
            model = load_text_model(name)
            start = time.perf_counter()
            relevance, logit = attnlrp(model, ids, labels)
            seconds = (time.perf_counter() - start) / len(ids)
            row: dict[str, float | str] = score_map(model, ids, labels, evidence, relevance)
            gap = ((relevance.sum(1).double() - logit.double()).abs() / logit.double().abs())
            row.update(completeness=gap.mean().item(), seconds=seconds)
            rows[name] = row
        except Exception as exc:
            rows[name] = {"reason": f"LXT AttnLRP failed: {type(exc).__name__}: {exc}"}
    return rows
