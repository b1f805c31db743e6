"""libra_transform: trace -> canonicalise -> match and rewrite, rule by rule -> audit."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch.fx as fx
from torch import nn

from .audit import untouched_ops
from .canonical import canonicalize
from .dataflow import Dataflow
from .errors import LibraError, LibraWarning, TrainingModeError, UncertifiedError
from .graph_module import LibraGraphModule
from .graph_utils import module_path, target_name
from .report import Rewrite, RewriteReport
from .rules import Rule, libra
from .trace import trace


def apply_rule(gm: fx.GraphModule, rule: Rule) -> list[Rewrite]:
    """Match ``rule`` on the whole graph first, then rewrite every match."""
    flow = Dataflow.of(gm)
    matches = [(n, p) for n in gm.graph.nodes if (p := rule.match(n, flow)) is not None]
    rewrites = []
    for node, payload in matches:
        name, where, op = node.name, module_path(node), target_name(node)
        action = rule.replace(gm.graph, node, payload)
        rewrites.append(Rewrite(name, where, rule.name, op, action))
    return rewrites


def libra_transform(
    model: nn.Module, *, rules: Sequence[Rule] | None = None, strict: bool = False
) -> LibraGraphModule:
    """The model's forward with LibraGrad's backward, as a GraphModule with ``libra_report``.

    ``model`` is not modified: the result shares its parameters and modules. ``rules``
    defaults to the full ``libra()`` preset. With ``strict=True`` a graph that still has a
    nonlinear op on the gradient path that no rule covers is refused with an error; otherwise
    it is returned, the op listed in the report and a ``LibraWarning`` issued.
    """
    if not isinstance(model, nn.Module):
        raise LibraError(f"libra_transform expects a torch.nn.Module, got {type(model).__name__}")
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise TrainingModeError(
            f"{type(model).__name__} is in training mode ({len(training)} modules, first "
            f"{training[0]!r}). LibraGrad explains the eval-mode forward (no dropout, "
            "running statistics), and libra_transform does not change your model: call "
            "model.eval() before transforming it."
        )
    rules = tuple(libra() if rules is None else rules)
    gm = canonicalize(trace(model))
    rewrites = [r for rule in rules for r in apply_rule(gm, rule)]
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    untouched = untouched_ops(gm, Dataflow.of(gm))
    report = RewriteReport(type(model).__name__, tuple(r.name for r in rules), rewrites, untouched)
    if untouched:
        listing = "; ".join(f"{u.node} ({u.op}) in {u.module or '<root>'}" for u in untouched)
        if strict:
            raise UncertifiedError(
                f"{len(untouched)} nonlinear op(s) on the gradient path have no rule, so the "
                f"explanation would not be complete: {listing}. Remove strict=True to get the "
                "graph anyway, or add a rule for these ops."
            )
        warnings.warn(
            f"libra_transform left {len(untouched)} nonlinear op(s) on the gradient path "
            f"untouched: {listing}; see the report.", LibraWarning, stacklevel=2)
    result = LibraGraphModule(gm, gm.graph, class_name=f"Libra{type(model).__name__}")
    result.libra_report = report
    return result
