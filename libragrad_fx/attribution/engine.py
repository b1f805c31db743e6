"""``CompiledModel``: one compiled form of a model (vanilla or LibraGrad), and ``run``, one
forward-backward on it whose ``Readout`` is what the methods compute from.

A run taps what a method needs (block inputs, bias-site operands, attention operands) as
extra graph outputs and takes every gradient in one ``torch.autograd.grad`` call, batched.
Both forms run the same code; only the graph differs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
from torch import Tensor, nn

from ..compiler.dataflow import Dataflow
from ..compiler.graph_module import LibraGraphModule
from ..compiler.transform import libra_transform
from ..errors import LibraError, LibraWarning
from . import attention as attn
from .bias_maps import SiteProbe, contribution, site_probes
from .probe import Probe
from .structure import Structure, structure
from .targets import Target
from .tokens import Layout, measure_layout


@dataclass(frozen=True)
class Needs:
    """What a method reads from a forward-backward run."""

    blocks: tuple[int, ...] = ()  # block inputs (value and gradient); negative counts back
    sites: bool = False  # bias maps
    attention: bool = False  # A and dA of every block
    stream_out: bool = False  # the residual stream after the last block (value only)
    input_grad: bool = False  # df/dx


@dataclass
class Readout:
    """What one forward-backward run read, token axes in the layout's order (prefix first)."""

    score: Tensor
    layout: Layout | None = None
    h: dict[int, Tensor] = field(default_factory=dict)  # (B, N_l, C): block l's positions
    g: dict[int, Tensor] = field(default_factory=dict)
    nodes: dict[int, fx.Node] = field(default_factory=dict)  # block l's input node
    site_tokens: list[tuple[int, Tensor, Tensor]] = field(default_factory=list)
    attention: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (B, H, T, T)
    stream_out: Tensor | None = None
    input_grad: Tensor | None = None


def _as_compiled(gm: LibraGraphModule, libra: bool) -> LibraGraphModule:
    """A module ``libra_transform`` returned, used as it is (never traced again): its own
    rules are its form. Vanilla maps of a Libra-compiled module need the original model."""
    rules = gm.libra_report.rules
    if bool(rules) != libra:
        form = "LibraGrad's rules (" + ", ".join(rules) + ")" if rules else "no rules (vanilla)"
        raise LibraError(
            f"{gm.libra_report.model} was compiled with {form}, and libra={libra} asks for the "
            "other form; pass the original model for both forms, or this module with "
            f"libra={bool(rules)}")
    return gm


class CompiledModel:
    """``model`` compiled once, with LibraGrad's rules (``libra=True``) or none.

    It keeps the compiled graph (which shares the model's parameters and submodules), not the
    model itself, so a cache of compiled models does not keep a dropped model alive.
    """

    def __init__(self, model: nn.Module, libra: bool, example: Tensor,
                 blocks: str | None = None, frontend: str = "auto",
                 input_name: str | None = None):
        self.libra, self.name = libra, type(model).__name__
        if isinstance(model, LibraGraphModule):
            self.gm = _as_compiled(model, libra)
        else:
            # two samples at least, so that an exported graph keeps its batch symbolic: the
            # layout is measured on batches of 1 and 2, the methods run on copies of x
            pair = example if example.shape[0] >= 2 else example[:1].expand(
                2, *example.shape[1:]).clone()
            inputs = (pair,) if input_name is None else {input_name: pair}
            with warnings.catch_warnings():
                if not libra:
                    warnings.simplefilter("ignore", LibraWarning)
                self.gm = libra_transform(model, rules=None if libra else (),
                                          example_inputs=inputs, frontend=frontend)
        self.sites = site_probes(self.gm, self.gm.libra_report.bias_sites)
        try:
            self._structure: Structure | LibraError = structure(self.gm, model, blocks)
        except LibraError as exc:  # raised when a method needs the blocks
            self._structure = exc
        self._last_block: dict[SiteProbe, int] | None = None
        self._probes: dict[tuple, Probe] = {}
        self._layouts: dict[tuple, Layout] = {}

    @property
    def structure(self) -> Structure:
        if isinstance(self._structure, LibraError):
            raise self._structure
        return self._structure

    def last_block(self, site: SiteProbe) -> int:
        """The last block whose input the site's op follows (-1: it comes before block 0)."""
        if self._last_block is None:
            graph = Dataflow.of(self.gm).graph
            after = [nx.descendants(graph, h) for h in self.structure.inputs]
            self._last_block = {
                s: max((i for i, d in enumerate(after) if s.node in d), default=-1)
                for s in self.sites}
        return self._last_block[site]

    def layout(self, x: Tensor) -> Layout:
        key = (tuple(x.shape[1:]), x.dtype, x.device.type)
        if key not in self._layouts:
            self._layouts[key] = measure_layout(self.gm, self.structure, x)
        return self._layouts[key]

    def probe(self, taps: tuple[fx.Node, ...], start: fx.Node | None = None) -> Probe:
        key = (tuple(n.name for n in taps), start.name if start is not None else None)
        if key not in self._probes:
            self._probes[key] = Probe(self.gm, taps, start)
        return self._probes[key]

    def run(self, x: Tensor, target: Target, needs: Needs) -> Readout:
        """One forward and one backward on the batch ``x``."""
        blocks, sites, att = self._selected(needs)
        layout = self.layout(x) if (blocks or sites or att or needs.stream_out) else None
        st = self.structure if layout is not None else None
        taps = [st.inputs[i] for i in blocks]
        taps += [n for s in sites for n in s.reads]
        taps += [n for a in att for n in attn.reads(a)]
        taps += [st.output] if needs.stream_out else []
        wanted = list(dict.fromkeys([st.inputs[i] for i in blocks]
                                    + [s.output for s in sites] + [a.output for a in att]))
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            output, values = self.probe(tuple(taps))(x)
            score = target.score(output, self.libra)
            # df/dx only when asked for: a token-level method then skips the embedding's backward
            with_x = needs.input_grad or not wanted
            tensors = [values[n] for n in wanted] + ([x] if with_x else [])
            grads = _gradients(score, tensors)
        grad_of = dict(zip(wanted, grads[:len(wanted)], strict=True))
        result = Readout(score.detach(), layout,
                         input_grad=grads[-1] if needs.input_grad else None)
        for i in blocks:
            node = st.inputs[i]
            result.nodes[i] = node
            result.h[i] = layout.positions(node, values[node].detach())
            result.g[i] = layout.positions(node, grad_of[node])
        for s in sites:
            axes = layout.axes.get(s.output)
            grad = grad_of[s.output]
            part = contribution(s, values, grad, axes is not None and axes.spare_last(grad.dim()))
            tokens = layout.to_tokens(s.output, part)
            if tokens is None:
                rest = layout.unassigned(s.output, part)
            else:
                rest = tokens.new_zeros(tokens.shape[0])
            result.site_tokens.append((self.last_block(s), tokens, rest))
        for i, a in enumerate(att):
            probs, grad = attn.probabilities(a, values, grad_of[a.output])
            _check_global(probs, layout, x.shape[0], st.paths[i])
            result.attention.append(tuple(layout.reorder(layout.reorder(t, -2), -1)
                                          for t in (probs, grad)))
        if needs.stream_out:
            result.stream_out = layout.positions(st.output, values[st.output].detach())
        return result

    def _selected(self, needs: Needs):
        count = len(self.structure.inputs) if (needs.blocks or needs.attention) else 0
        blocks = tuple(sorted({b % count for b in needs.blocks})) if needs.blocks else ()
        att = ()
        if needs.attention:
            att = self.structure.attention
            for site in att:
                if isinstance(site, LibraError):
                    raise site
            missing = [i for i, a in enumerate(att) if a is None]
            if missing:
                raise LibraError(
                    f"block {self.structure.paths[missing[0]]} of {self.name} has no attention "
                    "that attention methods can read (softmax(...) @ V, "
                    "scaled_dot_product_attention or nn.MultiheadAttention); use a gradient "
                    "method such as fullgrad+")
        return blocks, (self.sites if needs.sites else ()), att


def _gradients(score: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    if not score.requires_grad:
        raise LibraError("the score does not depend on the input through the model; check "
                         "the target")
    grads = torch.autograd.grad(score.sum(), tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g.detach()
            for t, g in zip(tensors, grads, strict=True)]


def _check_global(probs: Tensor, layout: Layout, batch: int, where: str) -> None:
    """Attention methods read token-to-token matrices over the map's tokens: refuse windowed
    attention (the batch folded with the windows) and attention over other positions."""
    if probs.dim() != 4 or probs.shape[0] != batch or probs.shape[-1] != layout.tokens \
            or probs.shape[-2] != layout.tokens:
        raise LibraError(
            f"the attention in {where} is {tuple(probs.shape)} (batch, heads, queries, keys), "
            f"not over the {layout.tokens} tokens of the first block's input for a batch of "
            f"{batch} (windowed or on another stage's grid); attention methods need global "
            "attention over one token stream: use a gradient method such as fullgrad+")
