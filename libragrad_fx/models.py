"""Load a model from a name given on the command line: timm, open_clip, or the user's own code.

Names come from the user; this module only knows how each library is asked for a model.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .errors import LibraError


def load_model(spec: str) -> nn.Module:
    """``NAME`` or ``timm:NAME`` (timm), ``open_clip:NAME`` (its image tower), ``module:attr``.

    Weights are random: the report depends on the architecture only. ``module:attr`` may name
    a module instance or a callable that returns one.
    """
    prefix, _, name = spec.rpartition(":")
    if prefix in ("", "timm"):
        import timm

        if name not in timm.list_models():
            raise LibraError(
                f"unknown timm model {name!r}; `python -c \"import timm; "
                f"print(timm.list_models('*{name[:6]}*'))\"` lists similar names")
        return timm.create_model(name, pretrained=False).eval()
    if prefix == "open_clip":
        import open_clip

        if name not in open_clip.list_models():
            raise LibraError(
                f"unknown open_clip model {name!r}; open_clip.list_models() lists them")
        return open_clip.create_model(name, pretrained=None).visual.eval()
    try:
        obj = getattr(importlib.import_module(prefix), name)
    except (ImportError, AttributeError) as exc:
        raise LibraError(f"cannot load {spec!r}: {exc}") from exc
    model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(model, nn.Module):
        raise LibraError(f"{spec!r} is a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def example_input(model: nn.Module, batch: int = 1) -> torch.Tensor | None:
    """A random image batch of the size the model was built for, when it says so.

    timm models carry ``pretrained_cfg["input_size"]``, open_clip image towers ``image_size``;
    the torch.export frontend needs such an input to run the model once.
    """
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if size is None and hasattr(model, "image_size"):
        side = model.image_size
        size = (3, *(side if isinstance(side, (tuple, list)) else (side, side)))
    if size is None:
        return None
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    return torch.randn(batch, *size, dtype=dtype)
