"""Other projects' explanations of the digits models, each computed by that project's own code.

- **LXT CP-LRP / AttnLRP** (lxt 2.1): lxt's patch functions, put on the classes the model is
  built from (``nn.GELU``, ``nn.LayerNorm``, ``nn.MultiheadAttention``) the way lxt's own
  torchvision map does, and lxt's attention wrappers (``cp_wrap_attention_forward``,
  ``wrap_attention_forward``) around ``F.scaled_dot_product_attention``, where timm computes
  attention. The patches change classes and torch.nn.functional for everyone, so they are on
  only inside :func:`lxt_patched` and restored after. The map is lxt's recipe: input × gradient
  of the target logit through the patched model. A block lxt has no patch for (timm's gated MLPs,
  AttnLRP inside ``nn.MultiheadAttention``) is reported instead of approximated.
- **Captum IG**: ``captum.attr.IntegratedGradients`` on the unmodified model, zero baseline.
- **LeGrad** (legrad-torch 1.1): ``LeWrapper(...).compute_legrad_clip`` on the open_clip model,
  the target caption's text embedding as the query; open_clip models only.

Every map is summed (LXT, Captum) or averaged (LeGrad, a min-max-normalised picture) over each
patch, so that the token-removal metrics rank the same patches ours do.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from libragrad_fx.digits.models import PATCH

PEERS = ("LXT CP-LRP", "LXT AttnLRP", "Captum IG", "LeGrad")
IG_STEPS = 32


@dataclass(frozen=True)
class PeerMap:
    """A peer's patch map (B, gh, gw) and its time per image, or why it could not run."""

    patch_map: Tensor | None
    seconds_per_image: float
    reason: str | None = None


def _patches(pixels: Tensor, reduce: str = "sum") -> Tensor:
    """(B, H, W) pixel relevance → (B, H/PATCH, W/PATCH)."""
    pooled = F.avg_pool2d(pixels[:, None], PATCH)[:, 0]
    return pooled * PATCH * PATCH if reduce == "sum" else pooled


@contextlib.contextmanager
def lxt_patched(variant: str, classes: set[type]) -> Iterator[None]:
    """lxt's ``variant`` ("cp" or "attnlrp") patches on ``classes`` and on
    F.scaled_dot_product_attention, restored on exit."""
    from lxt.efficient import monkey_patch
    from lxt.efficient.patches import (
        cp_multi_head_attention_forward,
        cp_wrap_attention_forward,
        layer_norm_forward,
        non_linear_forward,
        patch_method,
        wrap_attention_forward,
    )

    patch_map = {}
    for cls in classes:
        if issubclass(cls, nn.GELU):
            patch_map[cls] = partial(patch_method, non_linear_forward, keep_original=True)
        elif issubclass(cls, nn.LayerNorm):
            patch_map[cls] = partial(patch_method, layer_norm_forward)
        elif issubclass(cls, nn.MultiheadAttention) and variant == "cp":
            patch_map[cls] = partial(patch_method, cp_multi_head_attention_forward,
                                     keep_original=True)
    saved = {cls: {k: cls.__dict__[k] for k in ("forward", "original_forward")
                   if k in cls.__dict__} for cls in patch_map}
    sdpa = F.scaled_dot_product_attention
    wrap = cp_wrap_attention_forward if variant == "cp" else wrap_attention_forward
    wrapped = wrap(lambda module, q, k, v, *args, **kwargs: sdpa(q, k, v, *args, **kwargs))
    try:
        monkey_patch(None, patch_map)
        F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: wrapped(None, q, k, v, *a,
                                                                            **kw)
        yield
    finally:
        F.scaled_dot_product_attention = sdpa
        for cls, attributes in saved.items():
            for key in ("forward", "original_forward"):
                if key in attributes:
                    setattr(cls, key, attributes[key])
                elif key in cls.__dict__:
                    delattr(cls, key)


def _unsupported(model: nn.Module, variant: str) -> str | None:
    """Why lxt has no patch for part of ``model``, or None."""
    gated = {type(m).__name__ for m in model.modules()} & {"GluMlp", "SwiGLU", "SwiGLUPacked"}
    if gated:
        return (f"lxt 2.1 has no patch for timm's {', '.join(sorted(gated))} (its gated-MLP "
                "patches need Hugging Face's gate_proj/up_proj)")
    if variant == "attnlrp" and any(isinstance(m, nn.MultiheadAttention)
                                    for m in model.modules()):
        return "lxt 2.1 has AttnLRP for nn.MultiheadAttention only as CP-LRP"
    return None


def _input_x_gradient(model: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    leaf = x.clone().requires_grad_(True)
    model(leaf).gather(1, labels[:, None]).sum().backward()
    return (leaf * leaf.grad).sum(1).detach()


def _timed(call, x: Tensor) -> tuple[Tensor, float]:
    call()  # warm-up
    start = time.perf_counter()
    out = call()
    return out, (time.perf_counter() - start) / x.shape[0]


def peer_map(peer: str, model: nn.Module, x: Tensor, labels: Tensor) -> PeerMap:
    """``peer``'s map of ``model`` at ``x`` (B, 3, H, W) for the classes ``labels``."""
    if peer in ("LXT CP-LRP", "LXT AttnLRP"):
        variant = "cp" if peer == "LXT CP-LRP" else "attnlrp"
        reason = _unsupported(model, variant)
        if reason is not None:
            return PeerMap(None, float("nan"), reason)
        classes = {type(m) for m in model.modules()}

        def call() -> Tensor:
            with lxt_patched(variant, classes):
                return _input_x_gradient(model, x, labels)
    elif peer == "Captum IG":
        from captum.attr import IntegratedGradients

        def call() -> Tensor:
            ig = IntegratedGradients(model)
            return ig.attribute(x, baselines=0.0, target=labels, n_steps=IG_STEPS,
                                internal_batch_size=256).sum(1).detach()
    elif peer == "LeGrad":
        clip = getattr(model, "clip", None)
        if clip is None or not hasattr(clip, "visual"):
            return PeerMap(None, float("nan"), "legrad-torch 1.1 explains open_clip models only")
        return _legrad(model, x, labels)
    else:
        raise ValueError(f"unknown peer {peer!r}; one of {', '.join(PEERS)}")
    pixels, seconds = _timed(call, x)
    return PeerMap(_patches(pixels), seconds)


def _legrad(model: nn.Module, x: Tensor, labels: Tensor) -> PeerMap:
    from legrad import LeWrapper

    wrapper = LeWrapper(copy.deepcopy(model.clip))  # it hooks and re-enables grads in place

    def call() -> Tensor:
        maps = [wrapper.compute_legrad_clip(model.captions[int(c)][None], x[i:i + 1])
                for i, c in enumerate(labels)]
        return torch.cat(maps)[:, 0].detach()

    pixels, seconds = _timed(call, x)
    return PeerMap(_patches(pixels, reduce="mean"), seconds)


def measure_peer(model: nn.Module, peer: str, single, two) -> list[dict] | str:
    """Per-image metrics of ``peer``'s maps, as ``benchmarks.faithfulness.measure`` computes
    ours, or the reason it could not run. Completeness: for LXT, |Σ map − logit| / |logit|
    (LRP's conservation); for IG, against f(x) − f(0); LeGrad's map is a picture, so NaN."""
    from libragrad_fx.metrics import average_precision, class_discrimination, token_removal

    x, labels = single.images, single.labels
    found = peer_map(peer, model, x, labels)
    if found.patch_map is None:
        return found.reason
    curves = token_removal(model, x, found.patch_map, labels, internal_batch_size=512)
    with torch.no_grad():
        logit = model(x).gather(1, labels[:, None])[:, 0].double()
        if peer == "Captum IG":
            logit = logit - model(torch.zeros_like(x)).gather(1, labels[:, None])[:, 0]
    total = found.patch_map.flatten(1).sum(1).double()
    gap = ((total - logit).abs() / logit.abs() if peer != "LeGrad"
           else torch.full_like(total, float("nan")))
    shares = []
    for k in (0, 1):
        other = peer_map(peer, model, two.images, two.labels[:, k]).patch_map
        shares.append(class_discrimination(other, two.masks[:, k], two.masks[:, 1 - k]))
    columns = {"srg": curves.srg_probability, "mif": curves.mif_probability_area,
               "lif": curves.lif_probability_area, "srg_accuracy": curves.srg_accuracy,
               "completeness": gap, "ap": average_precision(found.patch_map, single.masks),
               "discrimination": (shares[0] + shares[1]) / 2,
               "seconds": torch.full_like(total, found.seconds_per_image)}
    return [{k: float(v[i]) for k, v in columns.items()} for i in range(x.shape[0])]
