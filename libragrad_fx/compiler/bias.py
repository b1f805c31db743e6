"""Bias sites: the constants that enter additively on a gradient path (DESIGN.md §3).

They are the z_b of FullGrad-completeness besides the input: the bias argument of a linear
layer, a convolution or a norm, position embeddings and tokens concatenated into the sequence,
attention biases assembled with ``cat``, and eval BatchNorm's running mean (whose
-mu*gamma/sqrt(var+eps) is its implicit bias). A site is named by the op that adds it and the
argument it arrives in, so its contribution is ``sum(value * d f / d value)`` at that argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn.functional as F

from .certify import additive_slots, argument_at, bias_sources
from .dataflow import Dataflow
from .graph_utils import module_path, target_name


@dataclass(frozen=True)
class BiasSite:
    """A constant that ``node`` adds on a gradient path, at argument ``path``."""

    node: str
    module: str
    op: str
    path: tuple
    source: tuple[str, ...]  # the parameters and buffers its value is computed from
    implicit: bool  # computed (expanded, concatenated, a running mean), not a parameter as is

    @property
    def argument(self) -> str:
        return "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in self.path)


def bias_sites(gm: fx.GraphModule, flow: Dataflow) -> list[BiasSite]:
    """Every bias site of ``gm``, in graph order."""
    sites = []
    for node in gm.graph.nodes:
        if not flow.needs_rule(node):
            continue
        for path in additive_slots(node):
            value = argument_at(node, path)
            sources = bias_sources(flow, value)
            if not sources:
                continue
            running_mean = node.target is F.batch_norm and path in ((1,), ("running_mean",))
            sites.append(BiasSite(
                node.name, module_path(node), target_name(node), path, sources,
                implicit=value.op != "get_attr" or running_mean,
            ))
    return sites
