"""Where the residual stream, its blocks and their attention are, read off the graph.

No model names: the blocks are the longest run of sibling modules of one class, named by
consecutive integers from 0 (``P.0, P.1, ...`` as in timm, or ``P.layer_0, P.layer_1, ...`` as in
torchvision), that the graph passes through; a block's input is the one value from outside the
block that carries gradient into it. ``blocks="P"`` (or ``"P.layer_"``) overrides the choice.
"""

from __future__ import annotations

import operator
import re
from collections import defaultdict
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from ..compiler import optable
from ..compiler.dataflow import Dataflow, gradient_inputs
from ..compiler.graph_utils import arg, is_call, module_path
from ..compiler.opspec import AttentionRead
from ..compiler.rules.base import is_passthrough
from ..errors import LibraError

_NUMBERED = re.compile(r"^(.*?)(\d+)$")  # a child name: a stem, then its index
_MATMULS = (operator.matmul, torch.matmul, torch.bmm)


@dataclass(frozen=True)
class AttentionSite:
    """One attention inside a block: how to read its probabilities and their gradient.

    ``kind`` is ``FUSED`` (``node`` is the fused call), ``SOFTMAX`` (``node`` is the
    product ``A @ v``, ``probs`` the left operand) or ``MODULE`` (``node`` is the
    ``nn.MultiheadAttention`` call, ``output`` its first result).
    """

    kind: AttentionRead
    node: fx.Node
    output: fx.Node
    probs: fx.Node | None = None


@dataclass(frozen=True)
class Structure:
    """The static plan for one graph: block inputs, the last block's output, attention."""

    path: str  # block i is the module path + str(i)
    inputs: tuple[fx.Node, ...]  # h_0 ... h_{L-1}
    output: fx.Node  # the residual stream after the last block
    attention: tuple[AttentionSite | None, ...]  # one per block, None where there is none


def _block_paths(gm: fx.GraphModule, model: nn.Module) -> dict[str, list[int]]:
    """Every run ``prefix -> [0, 1, ...]`` such that nodes were traced inside ``prefix + "i"``.

    A prefix is a parent path and a child-name stem: ``"blocks."`` for ``blocks.0``,
    ``"encoder.layers.encoder_layer_"`` for ``encoder.layers.encoder_layer_0``.
    """
    found: dict[str, set[int]] = defaultdict(set)
    for node in gm.graph.nodes:
        path = module_path(node)
        parts = path.split(".") if path else []
        for end in range(len(parts)):
            match = _NUMBERED.match(parts[end])
            if match is not None:
                parent = "".join(f"{p}." for p in parts[:end])
                found[parent + match.group(1)].add(int(match.group(2)))
    runs = {}
    for prefix, indices in found.items():
        run = sorted(indices)
        if run != list(range(len(run))) or len(run) < 2:
            continue
        try:
            kinds = {type(model.get_submodule(f"{prefix}{i}")) for i in run}
        except AttributeError:
            continue
        if len(kinds) == 1:
            runs[prefix] = run
    return runs


def _shown(prefix: str) -> str:
    """How a run is named to the user: ``P`` for ``P.0, P.1, ...``, else the prefix itself."""
    return prefix[:-1] if prefix.endswith(".") else prefix


def find_blocks(gm: fx.GraphModule, model: nn.Module,
                override: str | None = None) -> tuple[str, int]:
    """The prefix of the repeated blocks (block ``i`` is the module ``prefix + str(i)``) and
    how many there are."""
    runs = _block_paths(gm, model)
    if override is not None:
        matches = [p for p in runs if override in (p, _shown(p))]
        if not matches:  # a parent whose children have one numbered stem
            matches = [p for p in runs if p.rsplit(".", 1)[0] == override and "." in p]
        if len(matches) != 1:
            known = ", ".join(sorted(_shown(p) for p in runs)) or "none"
            raise LibraError(f"blocks={override!r} is not a run of sibling blocks the graph "
                             f"passes through; the runs found are: {known}")
        return matches[0], len(runs[matches[0]])
    if not runs:
        raise LibraError(
            f"{type(model).__name__} has no repeated blocks (sibling modules of one class named "
            "P.0, P.1, ... or P.layer_0, P.layer_1, ...) for explain to read its tokens from; "
            "pass blocks='path.to.blocks'")
    prefix = max(runs, key=lambda p: (len(runs[p]), -p.count(".")))
    return prefix, len(runs[prefix])


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
    while is_passthrough(value) or is_call(value, torch.detach):
        value = value.args[0]
    return value


def _attention(nodes: list[fx.Node], flow: Dataflow) -> AttentionSite | None:
    sites = []
    for node in nodes:
        op = optable.call_record(node)
        read = op.attention if op is not None else None
        if read is AttentionRead.FUSED:
            sites.append(AttentionSite(read, node, node))
        elif read is AttentionRead.MODULE:
            first = [u for u in node.users if is_call(u, operator.getitem) and u.args[1] == 0]
            if first:
                sites.append(AttentionSite(read, node, first[0]))
        elif is_call(node, *_MATMULS) and len(node.args) == 2:
            left = node.args[0]
            if is_call(_through(left), torch.softmax) and flow.depends_on_input(node.args[1]):
                sites.append(AttentionSite(AttentionRead.SOFTMAX, node, node, left))
    if len(sites) > 1:
        where = module_path(sites[0].node)
        raise LibraError(f"a block holds {len(sites)} attentions (first in {where!r}); "
                         "attention methods need one per block")
    return sites[0] if sites else None


def structure(gm: fx.GraphModule, model: nn.Module, blocks: str | None = None) -> Structure:
    """The residual stream of ``gm``: its block inputs, final value and attention sites."""
    flow = Dataflow.of(gm)
    path, count = find_blocks(gm, model, blocks)
    members: list[list[fx.Node]] = [[] for _ in range(count)]
    for node in gm.graph.nodes:
        for i in range(count):
            if _inside(node, f"{path}{i}"):
                members[i].append(node)
                break
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    image = nx.descendants(flow.graph, first) | {first}  # flags such as is_causal are not
    inputs = tuple(_block_input(m, image, f"{path}{i}") for i, m in enumerate(members))
    last = set(members[-1])
    leaving = [n for n in members[-1] if n in image and any(u not in last for u in n.users)]
    if len(leaving) != 1:
        raise LibraError(f"the last block {path}{count - 1} should hand one value to what "
                         f"follows; it hands {len(leaving)}")
    attention = tuple(_attention(m, flow) for m in members)
    return Structure(path, inputs, leaving[0], attention)


def sdpa_arguments(node: fx.Node) -> dict:
    """The fused call's arguments by name, so its probabilities can be recomputed."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    values = {name: arg(node, i, name, None) for i, name in enumerate(names)}
    values.update({k: v for k, v in node.kwargs.items() if k not in values})
    return values
