"""What is explained: f(x), one score per sample, from the model's output.

A class index (an int, or one per sample) gives its logit or, with ``score="probability"``, its
softmax probability; the logits are the output, or its ``logits`` entry for a dict or
ModelOutput, or its first entry for a tuple. A callable maps the output, as the model returns
it (a tensor, tuple, dict or ModelOutput), to the scores. A class index on a CLIP model is
refused: its output is an embedding, and the index would name a coordinate of it. For a CLIP
model a text (a prompt, or several) or a text embedding gives f = 100·cos(image, text) with the
text side fixed; under LibraGrad the image embedding's norm is a constant for the backward (the
L2-normalisation rule), so f stays complete.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ..errors import InputError

# (per-sample table, model output, libra) -> (B,)
Score = Callable[[Tensor | None, Tensor, bool], Tensor]
_CLIP_VOCABULARY = 49408  # open_clip's default SimpleTokenizer


@dataclass(frozen=True)
class Target:
    """A score function and its per-sample table (class indices or text embeddings; one row
    for every sample, or a row per sample)."""

    function: Score
    table: Tensor | None = None

    @property
    def count(self) -> int | None:
        """How many per-sample targets there are (None: one for every sample)."""
        return None if self.table is None or self.table.shape[0] == 1 else self.table.shape[0]

    def score(self, output: Tensor, libra: bool) -> Tensor:
        return self.function(self.table, output, libra)

    def take(self, rows: Tensor) -> Target:
        """The target of the samples ``rows`` (a batch of copies, steps or noisy samples)."""
        if self.count is None:
            return self
        return replace(self, table=self.table[rows.to(self.table.device)])


def _rows(table: Tensor, batch: int) -> Tensor:
    if table.shape[0] not in (1, batch):
        raise InputError(f"{table.shape[0]} targets for a batch of {batch} samples; pass one "
                         "target, or one per sample")
    return table.expand(batch, *table.shape[1:])


def has_text_tower(model: nn.Module) -> bool:
    return callable(getattr(model, "encode_text", None)) and callable(
        getattr(model, "encode_image", None))


def resolve(target: object, model: nn.Module, *, score: str = "logit",
            tokenizer: Callable | None = None) -> Target:
    """The ``Target`` for what the user passed (see the module doc)."""
    if score not in ("logit", "probability"):
        raise InputError(f"score must be 'logit' or 'probability', got {score!r}")
    if isinstance(target, str) or (isinstance(target, Sequence) and target
                                   and all(isinstance(t, str) for t in target)):
        texts = [target] if isinstance(target, str) else list(target)
        return Target(_cosine, _encode_texts(model, texts, tokenizer))
    if isinstance(target, Tensor) and target.is_floating_point():
        if not has_text_tower(model):
            raise InputError("a float tensor target is a text embedding, which needs a model "
                             "with a text tower (encode_image and encode_text); for classes "
                             "pass integer indices")
        return Target(_cosine, target.detach().reshape(-1, target.shape[-1]).float())
    if callable(target) and not isinstance(target, Tensor):
        return Target(_called(target))
    if isinstance(target, bool) or target is None:
        raise InputError(f"target must be a class index, a callable or a text; got {target!r}")
    if has_text_tower(model):
        raise InputError(
            f"target {target!r} is a class index, but {type(model).__name__} is a CLIP model: "
            "its output is an image embedding, so the index would explain one coordinate of "
            "it. Pass a prompt or a text embedding, or target=lambda e: e[:, N] to explain "
            "coordinate N on purpose")
    if isinstance(target, int):
        return Target(_class(score), torch.tensor([target]))
    indices = torch.as_tensor(target)
    if indices.is_floating_point() or indices.dim() > 1:
        raise InputError(f"class targets must be integers, one per sample; got shape "
                         f"{tuple(indices.shape)} ({indices.dtype})")
    return Target(_class(score), indices.reshape(-1))


def batch_of(output: object) -> int | None:
    """The batch size of a model output: the leading size of its first tensor."""
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, Tensor) and t.dim()]
    return leaves[0].shape[0] if leaves else None


def logits_of(output: object) -> object:
    """The class scores in an output: itself, its ``logits`` entry (a dict, a ModelOutput) or
    the first entry of a tuple."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        return output.get("logits", output)
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


def _class(score: str) -> Score:
    def f(indices: Tensor, output: Tensor, libra: bool) -> Tensor:
        output = logits_of(output)
        if not isinstance(output, Tensor) or output.dim() != 2:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise InputError(f"a class target needs an output of shape (batch, classes), got "
                             f"{shape}; pass a callable target for other outputs")
        classes = output.shape[1]
        bad = indices[(indices < 0) | (indices >= classes)]
        if bad.numel():
            raise InputError(f"target class {int(bad[0])} is out of range for an output with "
                             f"{classes} classes (valid: 0 to {classes - 1})")
        picked = _rows(indices.to(output.device), output.shape[0])
        values = output.softmax(-1) if score == "probability" else output
        return values.gather(1, picked[:, None])[:, 0]
    return f


def _called(function: Callable) -> Score:
    def f(table: None, output: Tensor, libra: bool) -> Tensor:
        value = function(output)
        batch = batch_of(output)
        if not isinstance(value, Tensor) or value.dim() != 1 or value.shape[0] != batch:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise InputError(f"a callable target must return one score per sample, shape "
                             f"({batch},); it returned {shape}")
        return value
    return f


def _cosine(text: Tensor, image: Tensor, libra: bool) -> Tensor:
    """100·cos(image, text), the text fixed; the image norm constant under LibraGrad."""
    if not isinstance(image, Tensor) or image.dim() != 2 or image.shape[1] != text.shape[1]:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise InputError(f"a text target needs image embeddings of width {text.shape[1]}, "
                         f"got {shape}")
    norm = image.norm(dim=-1)
    norm = norm.detach() if libra else norm
    unit = torch.nn.functional.normalize(text, dim=-1).to(image.device, image.dtype)
    return 100 * (image * _rows(unit, image.shape[0])).sum(-1) / norm


def _encode_texts(model: nn.Module, texts: list[str], tokenizer: Callable | None) -> Tensor:
    if not has_text_tower(model):
        raise InputError(f"a text target needs a model with a text tower (encode_image and "
                         f"encode_text, as an open_clip CLIP); {type(model).__name__} has none. "
                         "Pass a class index or a callable instead")
    if tokenizer is None:
        vocabulary = getattr(model, "vocab_size", _CLIP_VOCABULARY)
        if vocabulary != _CLIP_VOCABULARY:
            raise InputError(f"the model's vocabulary has {vocabulary} entries, not the default "
                             "CLIP tokenizer's; pass tokenizer=open_clip.get_tokenizer(NAME)")
        import open_clip

        def tokenizer(t: list[str]) -> Tensor:
            return open_clip.tokenize(t, context_length=getattr(model, "context_length", 77))
    tokens = tokenizer(texts)
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.encode_text(tokens.to(device)).float()


def token_logit(token: int, position: int = -1) -> Callable[[object], Tensor]:
    """A language-model target: the logit of ``token`` at ``position`` (default the last, the
    next-token prediction), from an output of (batch, positions, vocabulary) logits or a
    ModelOutput holding them."""
    def score(output: object) -> Tensor:
        logits = logits_of(output)
        if not isinstance(logits, Tensor) or logits.dim() != 3:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise InputError(f"token_logit needs (batch, positions, vocabulary) logits, got "
                             f"{shape}")
        if not -logits.shape[1] <= position < logits.shape[1]:
            raise InputError(f"position {position} is outside the {logits.shape[1]} positions")
        if not 0 <= token < logits.shape[2]:
            raise InputError(f"token {token} is outside the vocabulary of {logits.shape[2]}")
        return logits[:, position, token]
    return score


def continuation_logprob(tokens: Sequence[int]) -> Callable[[object], Tensor]:
    """A language-model target: log p(continuation | prompt) = Σ_i log softmax(logits at the
    position before token i)[token i], for an input whose last ``len(tokens)`` tokens are the
    continuation ``tokens``. Not homogeneous in the logits (the log-softmax), so its maps are
    not complete the way a logit's are."""
    wanted = torch.as_tensor(list(tokens), dtype=torch.long)
    if wanted.dim() != 1 or wanted.numel() == 0:
        raise InputError("continuation_logprob needs the continuation's token ids, one or more")

    def score(output: object) -> Tensor:
        logits = logits_of(output)
        if not isinstance(logits, Tensor) or logits.dim() != 3:
            raise InputError("continuation_logprob needs (batch, positions, vocabulary) logits")
        n = wanted.numel()
        if logits.shape[1] <= n:
            raise InputError(f"a continuation of {n} tokens needs a prompt before it: the "
                             f"input has {logits.shape[1]} positions")
        before = logits[:, -n - 1:-1].log_softmax(-1)
        picked = wanted.to(logits.device)[None, :, None].expand(logits.shape[0], n, 1)
        return before.gather(2, picked)[..., 0].sum(1)
    return score
