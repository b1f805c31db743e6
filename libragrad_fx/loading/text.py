"""Token ids -> the embeddings a text model is explained on.

An explanation needs a float input to take gradients with respect to; token ids are integers,
and the embedding lookup (a row of a table per id) has no gradient with respect to them. So a
text model is explained from its embedded tokens on: ``embed_tokens`` gives them, and the model
is transformed and run on ``inputs_embeds``::

    e = embed_tokens(model, input_ids)
    gm = libra_transform(model, example_inputs={"inputs_embeds": e})
    completeness_error(gm, e, target=token_id)

Attributions are then per token and channel of ``e`` (sum over channels for one score per
token). Nothing here imports transformers: any model with ``get_input_embeddings()`` (the
Hugging Face convention) works.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import InputError


def embed_tokens(model: nn.Module, input_ids: Tensor) -> Tensor:
    """The model's own token embeddings of ``input_ids`` (batch, tokens) -> (batch, tokens, dim).

    Computed with ``model.get_input_embeddings()`` under ``torch.no_grad()`` and returned
    detached: the lookup is not part of what is explained, its output is the explanation's
    input. Models that scale the embeddings inside their forward (Gemma multiplies by
    sqrt(hidden size)) still do so when called on ``inputs_embeds``, as they do on ids.
    """
    get = getattr(model, "get_input_embeddings", None)
    table = get() if callable(get) else None
    if not isinstance(table, nn.Module):
        raise InputError(
            f"{type(model).__name__} has no get_input_embeddings() returning a module: embed "
            "the tokens with the model's own embedding layer and pass the result")
    if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() or input_ids.dim() != 2:
        raise InputError(
            "embed_tokens needs integer token ids of shape (batch, tokens), got "
            f"{type(input_ids).__name__}"
            + (f" {tuple(input_ids.shape)} ({input_ids.dtype})"
               if isinstance(input_ids, Tensor) else ""))
    with torch.no_grad():
        return table(input_ids).detach()
