"""Where the residual stream, its blocks and their attention are, read off the graph.

No model names: the blocks are the longest run of sibling modules ``P.0, P.1, ...`` of one
class that the graph passes through, and a block's input is the one value from outside the
block that carries gradient into it. ``blocks="P"`` overrides the choice for unusual models.
"""

from __future__ import annotations

import operator
import re
from collections import defaultdict
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import mha, ops
from ..dataflow import Dataflow, gradient_inputs
from ..errors import LibraError
from ..graph_utils import arg, is_call, module_path
from ..rules.base import is_passthrough

_INDEX = re.compile(r"^(.*)\.(\d+)$")
_MATMULS = (operator.matmul, torch.matmul, torch.bmm)


@dataclass(frozen=True)
class AttentionSite:
    """One attention inside a block: how to read its probabilities and their gradient.

    ``kind`` is ``"sdpa"`` (``node`` is the fused call), ``"softmax"`` (``node`` is the
    product ``A @ v``, ``probs`` the left operand) or ``"mha"`` (``node`` is the
    ``multihead_attention`` call, ``output`` its first result).
    """

    kind: str
    node: fx.Node
    output: fx.Node
    probs: fx.Node | None = None


@dataclass(frozen=True)
class Structure:
    """The static plan for one graph: block inputs, the last block's output, attention."""

    path: str
    inputs: tuple[fx.Node, ...]  # h_0 ... h_{L-1}
    output: fx.Node  # the residual stream after the last block
    attention: tuple[AttentionSite | None, ...]  # one per block, None where there is none


def _block_paths(gm: fx.GraphModule, model: nn.Module) -> dict[str, list[int]]:
    """Every ``P -> [indices]`` such that nodes were traced inside ``P.i``."""
    found: dict[str, set[int]] = defaultdict(set)
    for node in gm.graph.nodes:
        path = module_path(node)
        parts = path.split(".") if path else []
        for end in range(1, len(parts)):
            if parts[end].isdigit():
                found[".".join(parts[:end])].add(int(parts[end]))
    runs = {}
    for parent, indices in found.items():
        run = sorted(indices)
        if run != list(range(len(run))) or len(run) < 2:
            continue
        try:
            kinds = {type(model.get_submodule(f"{parent}.{i}")) for i in run}
        except AttributeError:
            continue
        if len(kinds) == 1:
            runs[parent] = run
    return runs


def find_blocks(gm: fx.GraphModule, model: nn.Module, override: str | None = None) -> str:
    """The module path ``P`` of the repeated blocks ``P.0 ... P.{L-1}``."""
    runs = _block_paths(gm, model)
    if override is not None:
        if override not in runs:
            known = ", ".join(sorted(runs)) or "none"
            raise LibraError(f"blocks={override!r} is not a run of sibling blocks the graph "
                             f"passes through; the runs found are: {known}")
        return override
    if not runs:
        raise LibraError(
            f"{type(model).__name__} has no repeated blocks (modules P.0, P.1, ... of one "
            "class) for explain to read its tokens from; pass blocks='path.to.blocks'")
    return max(runs, key=lambda p: (len(runs[p]), -p.count(".")))


def _inside(node: fx.Node, prefix: str) -> bool:
    path = module_path(node)
    return path == prefix or path.startswith(prefix + ".")


def _block_input(nodes: list[fx.Node], image: set[fx.Node], where: str) -> fx.Node:
    members = set(nodes)
    external = {i for n in nodes for i in gradient_inputs(n) if i not in members and i in image}
    if len(external) != 1:
        names = ", ".join(sorted(n.name for n in external)) or "none"
        raise LibraError(f"block {where} should read one input-dependent value from outside "
                         f"(the residual stream); it reads {names}. Pass blocks= to choose "
                         "other blocks")
    return external.pop()


def _through(value: object) -> object:
    """Back through reshapes, casts, dropout and detach to the producer."""
    while is_passthrough(value) or is_call(value, torch.detach, ops.cst):
        value = value.args[0]
    return value


def _attention(nodes: list[fx.Node], flow: Dataflow) -> AttentionSite | None:
    sites = []
    for node in nodes:
        if is_call(node, F.scaled_dot_product_attention):
            sites.append(AttentionSite("sdpa", node, node))
        elif is_call(node, mha.multihead_attention, mha.libra_multihead_attention):
            first = [u for u in node.users if is_call(u, operator.getitem) and u.args[1] == 0]
            if first:
                sites.append(AttentionSite("mha", node, first[0]))
        elif is_call(node, *_MATMULS) and len(node.args) == 2:
            left = node.args[0]
            if is_call(_through(left), torch.softmax) and flow.depends_on_input(node.args[1]):
                sites.append(AttentionSite("softmax", node, node, left))
    if len(sites) > 1:
        where = module_path(sites[0].node)
        raise LibraError(f"a block holds {len(sites)} attentions (first in {where!r}); "
                         "attention methods need one per block")
    return sites[0] if sites else None


def structure(gm: fx.GraphModule, model: nn.Module, blocks: str | None = None) -> Structure:
    """The residual stream of ``gm``: its block inputs, final value and attention sites."""
    flow = Dataflow.of(gm)
    path = find_blocks(gm, model, blocks)
    count = len(_block_paths(gm, model)[path])
    members: list[list[fx.Node]] = [[] for _ in range(count)]
    for node in gm.graph.nodes:
        for i in range(count):
            if _inside(node, f"{path}.{i}"):
                members[i].append(node)
                break
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    image = nx.descendants(flow.graph, first) | {first}  # flags such as is_causal are not
    inputs = tuple(_block_input(m, image, f"{path}.{i}") for i, m in enumerate(members))
    last = set(members[-1])
    leaving = [n for n in members[-1] if n in image and any(u not in last for u in n.users)]
    if len(leaving) != 1:
        raise LibraError(f"the last block {path}.{count - 1} should hand one value to what "
                         f"follows; it hands {len(leaving)}")
    attention = tuple(_attention(m, flow) for m in members)
    return Structure(path, inputs, leaving[0], attention)


def sdpa_arguments(node: fx.Node) -> dict:
    """The fused call's arguments by name, so its probabilities can be recomputed."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    values = {name: arg(node, i, name, None) for i, name in enumerate(names)}
    values.update({k: v for k, v in node.kwargs.items() if k not in values})
    return values
