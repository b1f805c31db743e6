"""Probes: a graph that also hands back the values of chosen nodes, and its tail from a node on.

A method's intermediate values (block inputs, bias-site outputs, attention operands) come out
of one forward as extra outputs, so their gradients come out of one backward with
``torch.autograd.grad``: no hooks, no per-sample loops, and the forward's values stay the
graph's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.fx.graph import _PyTreeCodeGen

from ..compiler import optable
from ..errors import InputError, LibraError


def _own_backward(node: fx.Node) -> bool:
    """One of our custom backwards (``detached_params`` in the op table): handed detached
    parameters, it skips weight gradients without having to ask the engine (runtime
    ``ops.wanted``), which is private API that a future torch may change."""
    op = optable.call_record(node)
    return op is not None and op.detached_params


class Probe:
    """``gm`` returning ``(output, {node: value})`` for ``taps``.

    With ``start`` given, the graph runs from that node on: the node becomes a second input
    (``stream``), and what only fed it is dropped, which is how integrated gradients
    interpolates the residual stream without recomputing the embedding.
    """

    def __init__(self, gm: fx.GraphModule, taps: Sequence[fx.Node], start: fx.Node | None = None):
        graph = fx.Graph()
        mapping: dict[fx.Node, fx.Node] = {}
        output = graph.graph_copy(gm.graph, mapping)
        # a ModelOutput is rebuilt by the graph's pytree codegen: here the copy hands back its
        # flat values, and __call__ rebuilds the object the model returns
        codegen = gm.graph._codegen
        self._out_spec = (codegen.pytree_info.out_spec if isinstance(codegen, _PyTreeCodeGen)
                          and codegen.pytree_info.out_spec is not None else None)
        _parameters_as_constants(gm, graph)
        self.taps = tuple(dict.fromkeys(taps))
        graph.output((output, tuple(mapping[t] for t in self.taps)))
        if start is not None:
            first_input = next(n for n in graph.nodes if n.op == "placeholder")
            with graph.inserting_after(first_input):  # before any optional argument
                stream = graph.placeholder("stream")
            mapping[start].replace_all_uses_with(stream)
        self.module = fx.GraphModule(gm, graph)
        if start is not None:  # owned by a module, so that impure ops (batch norm) are kept
            self.module.graph.eliminate_dead_code()
            self.module.recompile()
        self.module.graph.lint()

    def __call__(self, *inputs: Tensor) -> tuple[Any, dict[fx.Node, Any]]:
        try:
            output, values = self.module(*inputs)
        except LibraError:
            raise
        except Exception as exc:
            shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
            raise InputError(f"the model could not run on input(s) of shape {shapes}: "
                             f"{str(exc).strip().splitlines()[-1]}") from exc
        if self._out_spec is not None:
            output = pytree.tree_unflatten(list(output), self._out_spec)
        return output, dict(zip(self.taps, values, strict=True))


def _parameters_as_constants(gm: fx.GraphModule, graph: fx.Graph) -> None:
    """Hand our custom backwards their parameters through ``detach``. Methods take gradients with
    respect to activations only; native kernels then skip the weight gradient by themselves,
    but a custom backward cannot tell that nobody asks for it. Other ops keep the parameters
    themselves (``nn.MultiheadAttention`` takes its fast path by identity)."""
    for node in list(graph.nodes):
        if node.op != "get_attr" or not isinstance(attrgetter(node.target)(gm), nn.Parameter):
            continue
        users = [u for u in node.users if _own_backward(u)]
        if users:
            with graph.inserting_after(node):
                constant = graph.call_function(torch.detach, (node,))
            for user in users:
                user.replace_input_with(node, constant)
