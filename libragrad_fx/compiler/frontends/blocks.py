"""Higher-order blocks of an exported graph, inlined so that the rules can see their ops.

Export keeps ``with torch.no_grad():`` regions and disabled-autocast regions (rotary tables)
as calls around subgraphs; inlined here, their ops are in the graph (and, under no_grad, their
outputs constants), and no subgraph is left that a later pass could find unreferenced.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .module_paths import copy_node

_SET_GRAD = torch.ops.higher_order.wrap_with_set_grad_enabled
_AUTOCAST = torch.ops.higher_order.wrap_with_autocast


def _block(node: fx.Node, owner: nn.Module) -> tuple[fx.GraphModule, tuple, bool] | None:
    """(subgraph, its inputs, detach outputs?) for a higher-order block that can be inlined.

    ``with torch.no_grad():`` (``wrap_with_set_grad_enabled(False, ...)``) is inlined with its
    outputs detached: the same values, constants for the backward. A *disabled* autocast
    region (``wrap_with_autocast(device, dtype, False, ...)``, as rotary embeddings write to
    keep their tables in full precision) runs its ops as written, so it is inlined as it is.
    Any other higher-order op stays a call (the certificate names it).
    """
    if node.op != "call_function":
        return None
    if node.target is _SET_GRAD and node.args[0] is False:
        sub, inputs, detach = node.args[1], node.args[2:], True
    elif node.target is _AUTOCAST and node.args[2] is False:
        sub, inputs, detach = node.args[4], node.args[5:], False
    else:
        return None
    if not (isinstance(sub, fx.Node) and sub.op == "get_attr"):
        return None
    return operator.attrgetter(sub.target)(owner), inputs, detach


def inline(graph: fx.Graph, node: fx.Node, env: dict, model: nn.Module, owner: nn.Module,
            root: dict) -> tuple | None:
    """The outputs of an inlinable higher-order block, its ops copied into ``graph``.

    Blocks nested inside it are inlined the same way (recursively); a nested block that cannot
    be, and tensor constants of the block, become attributes of the root, so no subgraph is
    left behind that a later pass could find unreferenced. Export keeps such blocks as calls
    around subgraphs that the rules and the certificate cannot see into; inlined, their ops are
    visible (and, under no_grad, their outputs constants).
    """
    found = _block(node, owner)
    if found is None:
        return None
    block, args, detach = found
    inner, inputs = {}, iter(args)
    outputs: Any = ()
    for n in block.graph.nodes:
        if n.op == "placeholder":
            value = next(inputs)
            inner[n] = env[value] if isinstance(value, fx.Node) else value
        elif n.op == "output":
            outputs = n.args[0]
        elif n.target is operator.getitem and isinstance(inner.get(n.args[0]), tuple):
            inner[n] = inner[n.args[0]][n.args[1]]
        elif n.op == "get_attr":
            name = _fresh(root, f"{node.name}_{n.target}".replace(".", "_"))
            root[name] = operator.attrgetter(n.target)(block)
            inner[n] = graph.get_attr(name)
            inner[n].meta = dict(n.meta)
        else:
            nested = inline(graph, n, inner, model, block, root)
            inner[n] = nested if nested is not None else copy_node(graph, n, inner, model)
    if not detach:
        return tuple(inner[v] if isinstance(v, fx.Node) else v for v in outputs)
    detached = []
    for value in outputs:
        if isinstance(value, fx.Node):
            new = graph.call_function(torch.detach, (inner[value],))
            new.meta = dict(inner[value].meta)
            detached.append(new)
        else:
            detached.append(value)
    return tuple(detached)


def _fresh(root: dict, name: str) -> str:
    out, i = name, 0
    while out in root:
        i += 1
        out = f"{name}_{i}"
    return out
