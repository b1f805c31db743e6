"""Where the residual stream, its blocks and their attention are, read off the graph.

No model names: the blocks are the longest run of sibling modules of one class, named by
consecutive integers from 0 (``P.0, P.1, ...`` as in timm, or ``P.layer_0, P.layer_1, ...`` as in
torchvision), that the graph passes through, or in a hierarchical model the runs under each
member of a numbered run, stage after stage (``layers.0.blocks.0, ..., layers.1.blocks.0``) when
that gives more blocks; a block's input is the one value from outside the block that carries
gradient into it. ``blocks="P"`` (or ``"P.layer_"``, ``"layers.*.blocks"``) overrides the choice.
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

    name: str  # how the blocks are named to the user: "blocks", "layers.*.blocks"
    paths: tuple[str, ...]  # block i's module path, in graph order
    inputs: tuple[fx.Node, ...]  # h_0 ... h_{L-1}
    output: fx.Node  # the residual stream after the last block
    # one per block, None where there is none, the error where it cannot be read
    attention: tuple[AttentionSite | LibraError | None, ...]


def _numbered(gm: fx.GraphModule) -> dict[str, set[int]]:
    """Every ``prefix -> {i, ...}`` such that nodes were traced inside ``prefix + "i"``.

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
    return found


def _one_class(model: nn.Module, paths: list[str]) -> bool:
    try:
        return len({type(model.get_submodule(p)) for p in paths}) == 1
    except AttributeError:
        return False


def _block_paths(gm: fx.GraphModule, model: nn.Module) -> dict[str, list[int]]:
    """The runs ``prefix -> [0, 1, ...]`` of sibling modules of one class (one or more)."""
    runs = {}
    for prefix, indices in _numbered(gm).items():
        run = sorted(indices)
        if run == list(range(len(run))) and _one_class(model, [f"{prefix}{i}" for i in run]):
            runs[prefix] = run
    return runs


def _first_use(gm: fx.GraphModule) -> dict[str, int]:
    """Each module path's first node in graph order (and each of its parents')."""
    first: dict[str, int] = {}
    for index, node in enumerate(gm.graph.nodes):
        parts = module_path(node).split(".")
        for end in range(1, len(parts) + 1):
            first.setdefault(".".join(parts[:end]), index)
    return first


def _candidates(gm: fx.GraphModule, model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every way to read the blocks, by the name shown to the user: a run of two or more
    siblings (``blocks``), and runs under the members of a numbered run, stage after stage
    (``layers.*.blocks``, ``features.*``; the stages need not be one class, as torchvision's
    ``features`` mixes stages with patch merging), when every block is of one class."""
    runs = _block_paths(gm, model)
    found = _numbered(gm)
    first = _first_use(gm)
    chosen = {_shown(p): tuple(f"{p}{i}" for i in run) for p, run in runs.items()
              if len(run) >= 2}
    nested: dict[tuple[str, str], list[str]] = defaultdict(list)
    for outer, indices in found.items():
        for i in sorted(indices):
            stage = f"{outer}{i}."
            for prefix, run in runs.items():
                stem = prefix[len(stage):]
                if prefix.startswith(stage) and "." not in stem.rstrip("."):
                    nested[(outer, stem)] += [f"{prefix}{j}" for j in run]
    for (outer, stem), paths in nested.items():
        stages = {p[len(outer):].split(".", 1)[0] for p in paths}
        if len(stages) >= 2 and _one_class(model, paths):
            paths.sort(key=lambda p: first.get(p, 0))
            chosen[f"{outer}*.{_shown(stem)}" if stem else f"{outer}*"] = tuple(paths)
    return chosen


def _shown(prefix: str) -> str:
    """How a run is named to the user: ``P`` for ``P.0, P.1, ...``, else the prefix itself."""
    return prefix[:-1] if prefix.endswith(".") else prefix


def find_blocks(gm: fx.GraphModule, model: nn.Module,
                override: str | None = None) -> tuple[str, tuple[str, ...]]:
    """The blocks' name and module paths, in graph order.

    The choice is the reading with the most blocks, the shallower on a tie: ViT's ``blocks``;
    Swin's ``layers.*.blocks`` (each stage's blocks) over ``layers`` (the stages) when a stage
    holds two or more blocks.
    """
    chosen = _candidates(gm, model)
    if override is not None:
        matches = [n for n in chosen if override in (n, n + ".")]
        if not matches:  # a parent whose children have one numbered stem
            matches = [n for n in chosen if n.rsplit(".", 1)[0] == override and "." in n]
        if len(matches) != 1:
            known = ", ".join(sorted(chosen)) or "none"
            raise LibraError(f"blocks={override!r} is not a run of sibling blocks the graph "
                             f"passes through; the runs found are: {known}")
        return matches[0], chosen[matches[0]]
    if not chosen:
        raise LibraError(
            f"{type(model).__name__} has no repeated blocks (sibling modules of one class named "
            "P.0, P.1, ... or P.layer_0, P.layer_1, ...) for explain to read its tokens from; "
            "pass blocks='path.to.blocks'")
    name = max(chosen, key=lambda n: (len(chosen[n]), -chosen[n][0].count(".")))
    return name, chosen[name]


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


def _attention(nodes: list[fx.Node], flow: Dataflow) -> AttentionSite | LibraError | None:
    """The block's one attention, None, or (returned, raised by the attention methods only)
    the error saying why there is not one."""
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
        return LibraError(f"a block holds {len(sites)} attentions (first in {where!r}); "
                          "attention methods need one per block")
    return sites[0] if sites else None


def structure(gm: fx.GraphModule, model: nn.Module, blocks: str | None = None) -> Structure:
    """The residual stream of ``gm``: its block inputs, final value and attention sites."""
    flow = Dataflow.of(gm)
    name, paths = find_blocks(gm, model, blocks)
    members: list[list[fx.Node]] = [[] for _ in paths]
    for node in gm.graph.nodes:
        for i, path in enumerate(paths):
            if _inside(node, path):
                members[i].append(node)
                break
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    image = nx.descendants(flow.graph, first) | {first}  # flags such as is_causal are not
    inputs = tuple(_block_input(m, image, p) for m, p in zip(members, paths, strict=True))
    last = set(members[-1])
    leaving = [n for n in members[-1] if n in image and any(u not in last for u in n.users)]
    if len(leaving) != 1:
        raise LibraError(f"the last block {paths[-1]} should hand one value to what "
                         f"follows; it hands {len(leaving)}")
    attention = tuple(_attention(m, flow) for m in members)
    return Structure(name, paths, inputs, leaving[0], attention)


def sdpa_arguments(node: fx.Node) -> dict:
    """The fused call's arguments by name, so its probabilities can be recomputed."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    values = {name: arg(node, i, name, None) for i, name in enumerate(names)}
    values.update({k: v for k, v in node.kwargs.items() if k not in values})
    return values
