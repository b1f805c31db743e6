"""The evaluation protocols a real-data run follows, as named presets.

A protocol fixes what the numbers mean, so that a table can be set beside a paper's: how patches
are removed, at which fractions, what score is read, which label is explained, how many images
and which seed. ``libragrad`` is the LibraGrad paper's protocol (MIF/LIF on the accuracy of the
predicted label and on its probability, token dropping, fractions 0, 0.1 … 0.9, 1000 images);
``reslrp`` is the one ResLRP (2026) reports SRG under (patch-grid occlusion filled with each
image's per-channel mean, 100 steps, the logit of the target, 500 images).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Protocol:
    """How a real-data run measures faithfulness (see the module doc)."""

    name: str
    mode: str  # token_removal's mode: "auto" (drop, else zero) or "pixel"
    fractions: tuple[float, ...]
    score: str  # "probability" or "logit": what the curves read
    fill: str | None  # pixel mode: "mean" (each image's per-channel mean) or None (zeros)
    images: int
    seed: int = 0
    label: str = "predicted"  # "predicted" (the model's argmax) or "true" (the folder's label)
    summary: str = ""

    def fill_for(self, x: Tensor) -> Tensor | float:
        """What removed pixels are painted with, for the batch ``x`` (B, C, H, W)."""
        return x.mean(dim=(2, 3), keepdim=True) if self.fill == "mean" else 0.0


PROTOCOLS: dict[str, Protocol] = {
    "libragrad": Protocol(
        "libragrad", mode="auto", fractions=tuple(i / 10 for i in range(10)),
        score="probability", fill=None, images=1000,
        summary="LibraGrad (CVPR 2025): MIF/LIF on the predicted label's accuracy and "
                "probability, tokens dropped after the embedding, fractions 0, 0.1 … 0.9, "
                "trapezoid rule, 1000 images, seed 0"),
    "reslrp": Protocol(
        "reslrp", mode="pixel", fractions=tuple(i / 100 for i in range(100)),
        score="logit", fill="mean", images=500,
        summary="ResLRP (2026): patch-grid occlusion filled with the image's per-channel mean, "
                "100 steps, the predicted label's logit, trapezoid rule, 500 images, seed 0"),
}


def protocol(name: str) -> Protocol:
    """The preset ``name``, or a ValueError listing the presets."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
