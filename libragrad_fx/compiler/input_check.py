"""The one check of an input that a model will run on and gradients be taken at, shared by
``explain``, ``completeness_error`` and the metrics.

Each failure is one ``InputError`` naming what was passed and what is expected, before any
work: what would otherwise surface as a torch error deep inside a traced graph (a dtype or
device mismatch, a tensor made under ``torch.inference_mode()``, an empty batch) or, worse, as
a finite number computed from NaNs.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..errors import InputError, LibraWarning


def describe(x: object) -> str:
    """What was passed, in a few words."""
    if isinstance(x, Tensor):
        where = "" if x.device.type == "cpu" else f" on {x.device}"
        return f"a tensor of shape {tuple(x.shape)} ({x.dtype}{where})"
    return f"a {type(x).__name__}"


def _parameter(model: nn.Module | None) -> Tensor | None:
    if model is None:
        return None
    return next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()),
                None)


def _has_values(x: Tensor, who: str) -> None:
    """A batch of at least one sample, on a device that holds values (not meta)."""
    if x.dim() and x.shape[0] == 0:
        raise InputError(f"{who} got an empty batch, {describe(x)}; pass at least one sample")
    if x.is_meta:
        raise InputError(f"{who} got a meta tensor, which holds no values: {describe(x)}")


def check_input(x: object, who: str, *, model: nn.Module | None = None,
                rank: int | None = None, gradients: bool = True) -> Tensor:
    """``x`` unchanged if ``model`` can run on it (and, with ``gradients``, gradients can be
    taken at it); else an InputError.

    Checked: a tensor, ``rank`` dimensions if given, a batch of at least one sample, a real
    (not meta) floating-point tensor, made outside inference mode when gradients are taken,
    with finite values, on the model's device and in its dtype.
    """
    if not isinstance(x, Tensor):
        raise InputError(f"{who} takes a batched input tensor; got {describe(x)}")
    if x.dim() == 0 or (rank is not None and x.dim() != rank):
        want = f"{rank} dimensions" if rank is not None else "a batch dimension"
        raise InputError(f"{who} takes an input with {want}; got {describe(x)}")
    _has_values(x, who)
    if not x.is_floating_point():
        raise InputError(
            f"{who} takes a floating-point input to take gradients at; got {describe(x)}. For "
            "token ids, explain their embeddings (libragrad_fx.embed_tokens)")
    if gradients and x.is_inference():
        raise InputError(
            f"{who} got a tensor made under torch.inference_mode(), which cannot record a "
            f"backward: {describe(x)}. Make it outside inference mode (or x.clone() there)")
    reference = _parameter(model)
    if reference is not None and reference.device != x.device:
        raise InputError(f"{who}: the input is on {x.device} but the model is on "
                         f"{reference.device}; move one of them (x.to({str(reference.device)!r}))")
    if reference is not None and reference.dtype != x.dtype:
        raise InputError(f"{who}: the input is {x.dtype} but the model is {reference.dtype}; "
                         f"pass x.to({reference.dtype}) or convert the model")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{who}: the input has {bad} NaN or infinite value(s) of {x.numel()}; "
                         "the gradients and every map of it would be meaningless")
    return x


def check_call(values: list[object], who: str) -> None:
    """The part of the check that applies to any call of a compiled module (which may take
    integer ids, and runs under inference mode): no meta tensor, no empty batch, and a warning
    for non-finite floating inputs, whose outputs would be NaN without an error."""
    for x in values:
        if not isinstance(x, Tensor):
            continue
        _has_values(x, who)
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            warnings.warn(f"{who}: the input {describe(x)} has NaN or infinite values; the "
                          "outputs and gradients will not be finite", LibraWarning, stacklevel=3)
