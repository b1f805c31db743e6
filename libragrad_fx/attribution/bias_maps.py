"""Bias maps: what each bias site contributes to f, position by position (DESIGN §3).

For a site that adds b inside the op y = op(..., b), its contribution is E ⊙ ∂f/∂y, where
E = J̃_b y · b is b as it lands in y (broadcast over the tokens, placed where ``cat`` puts it,
-mu*gamma/sigma for a running mean). Summed over every position it is b · ∂f/∂b, which is
what completeness counts. The common ops have E in closed form; any other op gets it exactly
from a local double backward under the graph's own backward (so under LibraGrad the q and k
biases of a fused attention contribute nothing, as they should).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..compiler import optable
from ..compiler.bias import BiasSite, is_implicit_slot
from ..compiler.opspec import AttentionRead, BiasMap


@dataclass(frozen=True)
class SiteProbe:
    """A bias site, the op that adds it, and the node whose gradient meets it."""

    site: BiasSite
    node: fx.Node
    output: fx.Node

    @property
    def reads(self) -> tuple[fx.Node, ...]:
        return (*self.node.all_input_nodes, self.output)


def site_probes(gm: fx.GraphModule, sites: list[BiasSite]) -> list[SiteProbe]:
    nodes = {n.name: n for n in gm.graph.nodes}
    probes = []
    for site in sites:
        node = nodes[site.node]
        output = node
        op = optable.call_record(node)
        if op is not None and op.attention is AttentionRead.MODULE:
            firsts = [u for u in node.users if u.args[1:] == (0,)]
            if not firsts:
                continue
            output = firsts[0]
        probes.append(SiteProbe(site, node, output))
    return probes


def _value(arg, values: dict):
    return fx.node.map_arg(arg, lambda n: values[n])


def _argument(node: fx.Node, path: tuple, values: dict):
    holder = node.kwargs if isinstance(path[0], str) else node.args
    value = holder[path[0]]
    return _value(value[path[1]] if len(path) == 2 else value, values)


def _along(b: Tensor, dim: int, ndim: int) -> Tensor:
    """``b`` (C,) shaped to broadcast along axis ``dim`` of an ``ndim``-D value."""
    return b.reshape([-1 if d == dim else 1 for d in range(ndim)])


def contribution(probe: SiteProbe, values: dict, grad: Tensor, sum_last: bool = False) -> Tensor:
    """E ⊙ ∂f/∂y for one site: shaped like y, summing to b · ∂f/∂b.

    ``sum_last`` is the caller's word that y's last axis holds channels only: a bias along it
    then comes summed over it (size 1), a matrix-vector product instead of a product the size
    of y that would be summed next.
    """
    node, path = probe.node, probe.site.path
    b = _argument(node, path, values).detach()
    grad = grad.detach()
    op = optable.call_record(node)
    how = op.bias_map if op is not None else BiasMap.EXACT
    if how is BiasMap.TRAILING:
        if sum_last and b.dim() == 1 and grad.dim() > 1 and b.shape[0] == grad.shape[-1]:
            return (grad @ b.to(grad.dtype)).unsqueeze(-1)
        return grad * b
    if how is BiasMap.SUBTRACTED:
        return grad * b if path[0] == 0 else -grad * b
    if how is BiasMap.CHANNELS:
        if is_implicit_slot(node, path):
            b = _implicit_mean(node, values)
        return grad * _along(b, 1, grad.dim())
    if how is BiasMap.PLACED:
        return _placed(node, path, values, grad, b)
    return grad * _by_double_backward(node, path, values)


def _implicit_mean(node: fx.Node, values: dict) -> Tensor:
    """The bias eval batch norm adds through its running mean (its one implicit slot):
    -mean * weight / sqrt(var+eps)."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps")
    call = dict(zip(names, _value(node.args, values), strict=False))
    call |= _value(dict(node.kwargs), values)
    scale = torch.rsqrt(call["running_var"] + call.get("eps", 1e-5))
    if call.get("weight") is not None:
        scale = scale * call["weight"]
    return -(call["running_mean"] * scale).detach()


def _placed(node: fx.Node, path: tuple, values: dict, grad: Tensor, b: Tensor) -> Tensor:
    pieces = _value(node.args[0], values)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    out = torch.zeros_like(grad)
    if node.target is torch.stack:
        out.select(dim, path[1]).copy_(grad.select(dim, path[1]) * b)
        return out
    dim = dim % grad.dim()
    start = sum(p.shape[dim] for p in pieces[:path[1]])
    size = b.shape[dim]
    out.narrow(dim, start, size).copy_(grad.narrow(dim, start, size) * b)
    return out


def _by_double_backward(node: fx.Node, path: tuple, values: dict) -> Tensor:
    """E = J̃_b y · b, exactly, for any op: d/du <J̃_bᵀ u, b> at the op's inputs."""
    args = list(_value(node.args, _detached(values)))
    kwargs = dict(_value(dict(node.kwargs), _detached(values)))
    holder, key = (kwargs, path[0]) if isinstance(path[0], str) else (args, path[0])
    if len(path) == 2:
        holder[key] = list(holder[key])
        holder, key = holder[key], path[1]
    b = holder[key].detach()
    leaf = b.clone().requires_grad_(True)
    holder[key] = leaf
    # the math kernel: fused attention kernels have no double backward
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        y = node.target(*args, **kwargs)
        y = y[0] if isinstance(y, tuple) else y
        u = torch.zeros_like(y, requires_grad=True)
        (vjp,) = torch.autograd.grad(y, leaf, u, create_graph=True, allow_unused=True)
        if vjp is None or not vjp.requires_grad:
            return torch.zeros_like(y)
        (jvp,) = torch.autograd.grad((vjp * b).sum(), u, allow_unused=True)
    return torch.zeros_like(y) if jvp is None else jvp.detach()


def _detached(values: dict) -> dict:
    return {n: v.detach() if isinstance(v, Tensor) else v for n, v in values.items()}
