"""Bias sites: the constants that enter additively on a gradient path (DESIGN.md §3).

They are the z_b of FullGrad-completeness besides the input: the bias argument of a linear
layer, a convolution or a norm, position embeddings and tokens concatenated into the sequence,
attention biases assembled with ``cat``, and eval BatchNorm's running mean (whose
-mu*gamma/sqrt(var+eps) is its implicit bias). Which arguments an op adds to its value is its
op-table record's ``adds``; a site is named by the op that adds it and the argument it arrives
in, so its contribution is ``sum(value * d f / d value)`` at that argument. The certificate
reads these facts (a bias has degree 1); it never provides them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from . import optable
from .dataflow import Dataflow
from .graph_utils import module_path, target_name
from .opspec import Arguments, Listed, Operands, TwoTensors

Path = tuple  # a path into node.args / node.kwargs: (index,), (index, j) or (name,)


def argument_at(node: fx.Node, path: Path) -> Any:
    """The argument of ``node`` at ``path``."""
    value: Any = node.kwargs if isinstance(path[0], str) else node.args
    for step in path:
        value = value[step] if not isinstance(value, dict) else value.get(step)
    return value


def _slot(node: fx.Node, index: int, name: str) -> Path | None:
    """The path of argument ``name`` (positional at ``index``), or None when it is absent."""
    if index < len(node.args):
        return (index,) if node.args[index] is not None else None
    return (name,) if node.kwargs.get(name) is not None else None


def additive_slots(node: fx.Node) -> list[Path]:
    """Paths of the arguments that ``node`` adds to its value (its possible bias sites)."""
    op = optable.call_record(node)
    adds = op.adds if op is not None else None
    if isinstance(adds, Arguments):
        return [p for i, name in adds.slots if (p := _slot(node, i, name)) is not None]
    if isinstance(adds, Operands):
        return [(i,) for i in adds.positions]
    if isinstance(adds, Listed):
        return [(0, j) for j in range(len(node.args[0]))]
    if isinstance(adds, TwoTensors):
        other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        return [(0,), (1,)] if isinstance(other, fx.Node) else []
    return []


def is_implicit_slot(node: fx.Node, path: Path) -> bool:
    """Whether the argument at ``path`` is a bias by what the op does with it, not as it is
    (eval batch norm's running mean)."""
    op = optable.call_record(node)
    adds = op.adds if op is not None else None
    return isinstance(adds, Arguments) and any(
        path in ((i,), (name,)) for i, name in adds.implicit)


def bias_sources(flow: Dataflow, value: Any) -> tuple[str, ...]:
    """The parameters and buffers behind ``value`` when it is a bias (a constant computed from
    them, not from the input, not zeros); empty otherwise."""
    if (not isinstance(value, fx.Node) or flow.reads_input(value)
            or optable.makes_zeros(value)):
        return ()
    return flow.constant_sources(value)


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
            sites.append(BiasSite(
                node.name, module_path(node), target_name(node), path, sources,
                implicit=value.op != "get_attr" or is_implicit_slot(node, path),
            ))
    return sites
