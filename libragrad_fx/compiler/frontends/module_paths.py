"""Module paths for the export frontend: dynamo's spellings as the fx frontend's dotted paths.

The rules' report and the attribution code read a node's module from
``meta["nn_module_stack"]``; export writes ``L['self'].blocks[0]``-style names there, and these
helpers put them in the form symbolic tracing gives (``blocks.0``), with the model's classes.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch.fx as fx
from torch import nn


def clean_path(path: str) -> str:
    """A dotted module path ('blocks.0.attn') from dynamo's spellings ("L['self'].blocks[0]")."""
    path = re.sub(r"^(L\['self'\]|L__self__)(?=[.\[]|$)", "", str(path))
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^'\"\]]*)['\"]?\]", r".\1", path)
    return path.strip(".")


def module_stack(model: nn.Module, stack: dict | None) -> OrderedDict:
    """The fx frontend's form: ``{path: (path, module class)}``, the root left out."""
    out = OrderedDict()
    for value in (stack or {}).values():
        path = clean_path(value[0])
        if path:
            try:
                kind = type(model.get_submodule(path))
            except AttributeError:
                kind = value[1]
            out[path] = (path, kind)
    return out


def owner_stack(model: nn.Module, target: str) -> OrderedDict:
    """The module stack of a parameter or buffer: its owning module and the ones above it."""
    parts = target.split(".")[:-1]
    paths = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return module_stack(model, {p: (p, None) for p in paths})


def copy_node(graph: fx.Graph, node: fx.Node, env: dict, model: nn.Module) -> fx.Node:
    """``node`` copied into ``graph`` (its inputs through ``env``), its module path rewritten."""
    new = graph.node_copy(node, lambda n: env[n])
    if "nn_module_stack" in node.meta:
        new.meta["nn_module_stack"] = module_stack(model, node.meta["nn_module_stack"])
    return new
