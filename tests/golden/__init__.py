"""Golden graphs: the rewritten graph of each reference model as readable text.

Regenerate with ``make golden`` (``python -m tests.golden``) after a change to the rules, and
review the diff: it shows exactly what the change did to each rewrite.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch.fx as fx
from torch import nn

from libragrad_fx import libra_transform

from .. import zoo

HERE = Path(__file__).parent

MODELS: dict[str, Callable[[], nn.Module]] = {
    "vit_tiny_patch16_224": lambda: zoo.timm_model("vit_tiny_patch16_224"),
    "eva02_tiny_patch14_224": lambda: zoo.timm_model("eva02_tiny_patch14_224"),
    "mixer_s16_224": lambda: zoo.timm_model("mixer_s16_224"),
    "open_clip_ViT-B-32_image": lambda: zoo.clip_model("ViT-B-32").visual,
    "open_clip_ViT-B-32_text": lambda: zoo.clip_text_tower("ViT-B-32"),
}


def render(gm: fx.GraphModule) -> str:
    """The report's totals and the graph, one node per line, with its module path."""
    report = gm.libra_report
    lines = [f"# {report.model}: " + ", ".join(f"{k} {v}" for k, v in report.counts.items())]
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        where = next(reversed(stack.values()))[0] if stack else ""
        lines.append(f"{node.format_node()}{'  # ' + where if where else ''}")
    return "\n".join(lines) + "\n"


def golden_text(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a golden model must be certified complete
        return render(libra_transform(MODELS[name]()))


def path(name: str) -> Path:
    return HERE / f"{name}.txt"
