"""The model zoo of the coverage sweep: which models, how to build them, their input sizes.

A model is named ``timm:NAME``, ``open_clip:NAME``, ``hf:CLASS[@sdpa]`` (coverage_hf.py) or
``torchvision:NAME`` (coverage_tv.py); for open_clip only the image tower is built (from the
config, so that no text tower, tokenizer or Hugging Face download is needed).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterator

import torch
from torch import nn

# The timm families the issue names: every model in them must transform and certify complete.
NAMED_FAMILIES = (
    "vision_transformer", "deit", "beit", "eva", "cait", "swin_transformer",
    "swin_transformer_v2", "swin_transformer_v2_cr", "mlp_mixer", "pit", "xcit",
)


# In-place initialisers: on meta tensors they only cost time (through Python reference kernels,
# about half the time of building a model on meta), so they are skipped there.
_INIT_METHODS = ("normal_", "uniform_", "fill_", "zero_", "erfinv_", "clamp_", "mul_", "add_",
                 "copy_", "exponential_", "random_", "bernoulli_")


@contextlib.contextmanager
def _skip_meta_init() -> Iterator[None]:
    originals = {m: getattr(torch.Tensor, m) for m in _INIT_METHODS}

    def skipping(method):
        def call(self, *args, **kwargs):
            return self if self.is_meta else method(self, *args, **kwargs)
        return call

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, skipping(method))
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


SOURCES = ("timm", "open_clip", "hf", "torchvision")


def split_key(key: str) -> tuple[str, str]:
    """``"timm:vit_tiny_patch16_224"`` -> ``("timm", "vit_tiny_patch16_224")``."""
    source, _, name = key.partition(":")
    if source not in SOURCES or not name:
        raise ValueError(f"model key must be SOURCE:NAME, SOURCE one of {SOURCES}, got {key!r}")
    return source, name


def timm_families() -> dict[str, list[str]]:
    """timm module name -> the model names registered in it."""
    import timm

    return {m: timm.list_models(module=m) for m in timm.list_modules()}


@functools.lru_cache(maxsize=1)
def _family_of_timm() -> dict[str, str]:
    return {name: fam for fam, names in timm_families().items() for name in names}


def open_clip_names() -> list[str]:
    import open_clip

    return list(open_clip.list_models())


def _open_clip_vision_cfg(name: str) -> tuple[dict, dict]:
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip config {name!r}")
    vision = dict(cfg["vision_cfg"])
    vision["timm_model_pretrained"] = False  # never download
    return cfg, vision


def _source_module(source: str):
    """The module that knows the models of ``source`` (hf or torchvision)."""
    if source == "hf":
        from benchmarks import coverage_hf as module
    else:
        from benchmarks import coverage_tv as module
    return module


def target_kind(key: str) -> str:
    """What the explained score is: ``class`` (argmax logit), ``last token`` (argmax logit at
    the last position, causal LMs) or ``feature`` (output[:, 0] of an embedding)."""
    source, name = split_key(key)
    if source == "hf":
        return "last token" if family(key).startswith("hf/causal") else "class"
    return "feature" if source == "open_clip" else "class"


def image_tower(key: str) -> str:
    """What builds the image tower: equal strings build the same architecture (open_clip
    configs often share one and differ in the text tower only)."""
    source, name = split_key(key)
    if source == "timm":
        return key
    cfg, vision = _open_clip_vision_cfg(name)
    return json.dumps([cfg["embed_dim"], cfg.get("quick_gelu", False), vision], sort_keys=True)


def family(key: str) -> str:
    """timm: the timm module; open_clip: ``open_clip/vit``, ``open_clip/resnet`` or
    ``open_clip/timm:MODULE`` for a timm trunk."""
    source, name = split_key(key)
    if source == "timm":
        return _family_of_timm().get(name, "?")
    if source in ("hf", "torchvision"):
        return _source_module(source).family(name)
    _, vision = _open_clip_vision_cfg(name)
    if vision.get("timm_model_name"):
        return f"open_clip/timm:{_family_of_timm().get(vision['timm_model_name'], '?')}"
    resnet = isinstance(vision.get("layers"), (list, tuple))
    return "open_clip/resnet" if resnet else "open_clip/vit"


def is_named(key: str) -> bool:
    """In the scope of the issue's promise: a named timm family, or an open_clip ViT config
    (open_clip's own VisionTransformer, or a timm trunk from a named family)."""
    source, name = split_key(key)
    if source in ("hf", "torchvision"):
        return _source_module(source).is_named(name)
    fam = family(key)
    if fam == "open_clip/vit":
        return True
    return fam.removeprefix("open_clip/timm:") in NAMED_FAMILIES


def build(key: str, device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[int, ...]]:
    """The eval-mode model (random weights) and its default input size (C, H, W)."""
    source, name = split_key(key)
    logging.getLogger().setLevel(logging.ERROR)
    if source == "hf":
        from benchmarks.coverage_hf import build as build_hf

        return build_hf(name, device)
    meta = torch.device(device).type == "meta"
    with torch.device(device), _skip_meta_init() if meta else contextlib.nullcontext():
        if source == "timm":
            import timm

            model = timm.create_model(name, pretrained=False)
            size = tuple(timm.data.resolve_model_data_config(model)["input_size"])
        elif source == "torchvision":
            from benchmarks.coverage_tv import build as build_tv

            model, size = build_tv(name)
        else:
            from open_clip.model import _build_vision_tower

            cfg, vision = _open_clip_vision_cfg(name)
            model = _build_vision_tower(cfg["embed_dim"], vision,
                                        quick_gelu=cfg.get("quick_gelu", False))
            image = vision.get("image_size", 224)
            size = (3, *(image if isinstance(image, (list, tuple)) else (image, image)))
    return model.eval(), size


def pixels(key: str) -> int:
    """H·W of the default input, from the config alone (no model is built)."""
    source, name = split_key(key)
    if source == "torchvision":
        return _source_module(source).pixels(name)
    if source == "hf":
        return 1
    if source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        size = cfg.input_size if cfg is not None else (3, 224, 224)
        return size[-1] * size[-2]
    image = _open_clip_vision_cfg(name)[1].get("image_size", 224)
    return image[0] * image[1] if isinstance(image, (list, tuple)) else image * image


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_family(fam: str) -> dict[str, int | None]:
    """Parameter counts of every model of a timm family (or ``open_clip``), built on meta."""
    keys = ([f"open_clip:{n}" for n in open_clip_names()] if fam == "open_clip"
            else [f"timm:{n}" for n in timm_families()[fam]])
    counts: dict[str, int | None] = {}
    for key in keys:
        try:
            counts[key] = count_params(build(key, "meta")[0])
        except Exception:  # noqa: BLE001 - a model that cannot be built has no count
            counts[key] = None
    return counts


def smallest(counts: dict[str, int | None], keys: list[str]) -> str | None:
    """The key with the fewest parameters, ignoring timm's ``test_*`` toy configurations."""
    real = [k for k in keys if counts.get(k) is not None and ":test_" not in k]
    return min(real, key=lambda k: (counts[k], k)) if real else None
