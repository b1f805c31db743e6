"""Load a model named on the command line, with its weights and the input it expects.

Names come from the user: ``digits:NAME`` (the shipped digits models), a timm name,
``open_clip:NAME`` or ``module:attr``. This module and the digits package are the only places
that know how each library is asked for a model; the compiler and the attribution code do not.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import LibraError
from .checkpoints import load_checkpoint
from .hub import pretrained_weights
from .inputs import Preprocessing

Pretrained = bool | str | None  # None/False: random weights; True: default tag; str: that tag


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode, what it was called, how to turn an image into its input, and
    (for CLIP models) the tokenizer its prompts need."""

    model: nn.Module
    name: str
    preprocessing: Preprocessing
    tokenizer: Callable | None = None
    random_weights: bool = False  # no shipped, pretrained or checkpoint weights were loaded

    @property
    def has_text(self) -> bool:
        """A CLIP model: it takes prompts (``--text``) rather than class indices."""
        return callable(getattr(self.model, "encode_text", None))

    @property
    def image_tower(self) -> nn.Module:
        """What the rewrite report is about: a CLIP model's image tower, else the model."""
        return getattr(self.model, "visual", self.model) if self.has_text else self.model


def load(spec: str, *, checkpoint: str | Path | None = None,
         pretrained: Pretrained = None) -> LoadedModel:
    """The model ``spec`` names: ``digits:NAME`` (shipped weights), ``NAME`` or ``timm:NAME``,
    ``open_clip:NAME`` (image and text towers) or ``module:attr`` (a module or a callable
    returning one). Weights are random unless ``checkpoint`` (a state_dict file) or
    ``pretrained`` (timm's or open_clip's own loading; a tag picks one) say otherwise."""
    if checkpoint is not None and pretrained:
        raise LibraError("give either a checkpoint or --pretrained, not both")
    prefix, _, name = spec.rpartition(":")
    if prefix == "digits":
        loaded = _digits(name, pretrained, checkpoint is None)
    elif prefix in ("", "timm"):
        loaded = _timm(name, pretrained)
    elif prefix == "open_clip":
        loaded = _open_clip(name, pretrained)
    else:
        loaded = _user(spec, prefix, name, pretrained)
    if checkpoint is not None:
        load_checkpoint(loaded.model, checkpoint, spec)
    random = checkpoint is None and not pretrained and prefix != "digits"
    return replace(loaded, random_weights=random)


def load_model(spec: str, *, checkpoint: str | Path | None = None,
               pretrained: Pretrained = None) -> nn.Module:
    """The model the report describes (a CLIP model's image tower); see :func:`load`."""
    return load(spec, checkpoint=checkpoint, pretrained=pretrained).image_tower


def _digits(name: str, pretrained: Pretrained, shipped: bool) -> LoadedModel:
    from ..digits import models as digits

    if isinstance(pretrained, str):
        raise LibraError(f"digits:{name} has one set of weights, the shipped one; drop the tag")
    model = digits.load(name) if shipped else digits.build(name)
    size = (digits.IMG_SIZE, digits.IMG_SIZE)
    return LoadedModel(model, f"digits:{name}", Preprocessing(size=size, grey=True))


def _timm(name: str, pretrained: Pretrained) -> LoadedModel:
    import timm
    from timm.data import resolve_data_config

    if name not in timm.list_models():
        raise LibraError(
            f"unknown timm model {name!r}; `python -c \"import timm; "
            f"print(timm.list_models('*{name[:6]}*'))\"` lists similar names")
    if pretrained:
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{name}.*")]
        tag = _tag(pretrained, tags, f"timm has no pretrained weights for {name}")
        full = name if tag is None else f"{name}.{tag}"  # None: timm's default tag
        with pretrained_weights(full):
            model = timm.create_model(full, pretrained=True)
    else:
        model = timm.create_model(name, pretrained=False)
    config = resolve_data_config({}, model=model)
    prep = Preprocessing(size=tuple(config["input_size"][1:]), mean=tuple(config["mean"]),
                         std=tuple(config["std"]), interpolation=config["interpolation"])
    return LoadedModel(model.eval(), name, prep)


def _open_clip(name: str, pretrained: Pretrained) -> LoadedModel:
    import open_clip

    if name not in open_clip.list_models():
        raise LibraError(
            f"unknown open_clip model {name!r}; open_clip.list_models() lists them")
    tag = None
    if pretrained:
        tags = open_clip.list_pretrained_tags_by_model(name)
        tag = _tag(pretrained, tags, f"open_clip has no pretrained weights for {name}")
        tag = tags[0] if tag is None else tag  # the first listed is the canonical one
        with pretrained_weights(f"{name} ({tag})"):
            model = open_clip.create_model(name, pretrained=tag)
    else:
        model = open_clip.create_model(name, pretrained=None)
    config = open_clip.get_model_preprocess_cfg(model)
    prep = Preprocessing(size=tuple(config["size"]), mean=tuple(config["mean"]),
                         std=tuple(config["std"]), interpolation=config["interpolation"])
    return LoadedModel(model.eval(), f"open_clip:{name}", prep, open_clip.get_tokenizer(name))


def _tag(pretrained: Pretrained, tags: list[str], none: str) -> str | None:
    """The tag asked for, checked against the library's list (None: the library's default)."""
    if not tags:
        raise LibraError(f"{none}; pass --checkpoint FILE (a state_dict in .pt, .pth or "
                         ".safetensors)")
    if pretrained is True:
        return None
    if pretrained not in tags:
        raise LibraError(f"unknown pretrained tag {pretrained!r}; the tags are: "
                         f"{', '.join(tags)}")
    return pretrained


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current folder on ``sys.path`` while a ``module:attr`` is imported, as ``python -m``
    would have it, and taken off again after."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _user(spec: str, prefix: str, name: str, pretrained: Pretrained) -> LoadedModel:
    if pretrained:
        raise LibraError(f"--pretrained serves timm and open_clip names; for {spec!r} pass "
                         "--checkpoint FILE (a state_dict in .pt, .pth or .safetensors)")
    try:
        with _cwd_importable():
            obj = getattr(importlib.import_module(prefix), name)
    except (ImportError, AttributeError) as exc:
        raise LibraError(f"cannot load {spec!r}: {exc}") from exc
    if callable(obj) and not isinstance(obj, nn.Module):
        try:
            obj = obj()
        except Exception as exc:
            raise LibraError(f"cannot load {spec!r}: calling {name}() failed "
                             f"({type(exc).__name__}: {exc}); point at a model instance, or at "
                             "a function or class that builds one with no arguments") from exc
    if not isinstance(obj, nn.Module):
        raise LibraError(f"{spec!r} is a {type(obj).__name__}, not a torch.nn.Module")
    x = example_input(obj)
    return LoadedModel(obj.eval(), spec, _stated(obj, None if x is None else x.shape[-2:]))


def _stated(model: nn.Module, size) -> Preprocessing:
    """What a user's model states about its input: timm's data config if it carries one."""
    config = getattr(model, "pretrained_cfg", None) or {}
    if "mean" in config and "std" in config:
        return Preprocessing(size=None if size is None else tuple(size),
                             mean=tuple(config["mean"]), std=tuple(config["std"]),
                             interpolation=config.get("interpolation", "bilinear"))
    return Preprocessing(size=None if size is None else tuple(size), stated=False)


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
