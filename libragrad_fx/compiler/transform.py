"""libra_transform: trace -> canonicalise -> match and rewrite, rule by rule -> certify."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch.fx as fx
from torch import nn

from ..errors import (
    LibraError,
    LibraWarning,
    TraceError,
    TrainingModeError,
    TransformBugError,
    UncertifiedError,
)
from .bias import bias_sites
from .canonical import canonicalize
from .certify import certify
from .dataflow import Dataflow
from .frontends.export import export_trace
from .frontends.fx import opaque_calls, trace
from .graph_module import LibraGraphModule
from .graph_utils import module_path, target_name
from .report import Rewrite, RewriteReport
from .rules import Rule, libra


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


_T = TypeVar("_T")


def _stage(stage: str, model: nn.Module, run: Callable[[], _T]) -> _T:
    """``run()``, with an unexpected exception turned into a TransformBugError naming the stage.

    LibraErrors are the library's own answers and pass through; anything else raised inside
    the transform is a bug of ours, never the user's, and is reported as one (cause chained).
    """
    try:
        return run()
    except LibraError:
        raise
    except Exception as exc:
        raise TransformBugError(
            f"libra_transform failed in its {stage} stage on {type(model).__name__}: "
            f"{type(exc).__name__}: {exc}. Report this as a libragrad_fx bug (the model's "
            "class and config, and this message)."
        ) from exc


def trace_model(
    model: nn.Module, example_inputs: tuple | None, frontend: str
) -> tuple[fx.GraphModule, str]:
    """The model as an FX graph, and which frontend produced it.

    ``auto`` tries symbolic tracing first (it keeps the user's modules and needs no input) and
    falls back to torch.export, which needs ``example_inputs``, when tracing fails or leaves
    fx-wrapped calls it could not step into on the gradient path (export runs their code, so
    their ops are recorded); if export then fails, the fx graph is kept and the certificate
    names those calls.
    """
    if frontend not in ("auto", "fx", "export"):
        raise LibraError(f"frontend must be 'auto', 'fx' or 'export', got {frontend!r}")
    if frontend == "export" and example_inputs is None:
        raise LibraError("frontend='export' needs example_inputs=(tensor,) to run the model on")
    if frontend == "export":
        return export_trace(model, tuple(example_inputs)), "export"
    try:
        gm = trace(model)
    except TraceError as exc:
        if frontend == "fx":
            raise
        if example_inputs is None:
            raise TraceError(
                f"{exc} To fall back to the torch.export frontend, pass "
                "example_inputs=(tensor,) with an input the model accepts."
            ) from exc.__cause__
        fx_failure = exc
    else:
        if frontend == "fx" or example_inputs is None or not opaque_calls(gm):
            return gm, "fx"
        try:
            return export_trace(model, tuple(example_inputs)), "export"
        except TraceError:
            return gm, "fx"  # the certificate names the opaque calls
    try:
        return export_trace(model, tuple(example_inputs)), "export"
    except TraceError as exc:
        raise TraceError(f"both frontends failed. fx: {fx_failure} export: {exc}") from exc


def libra_transform(
    model: nn.Module,
    *,
    rules: Sequence[Rule] | None = None,
    strict: bool = False,
    example_inputs: tuple | dict | None = None,
    frontend: str = "auto",
) -> LibraGraphModule:
    """The model's forward with LibraGrad's backward, as a GraphModule with ``libra_report``.

    ``model`` is not modified: the result shares its parameters and modules. ``rules``
    defaults to the full ``libra()`` preset. The result is certified (``libra_report.complete``)
    by propagating Euler degrees through the rewritten graph. With ``strict=True`` a graph that
    cannot be certified is refused with an error listing the violations; otherwise it is
    returned, the violations listed in the report and a ``LibraWarning`` issued.

    ``frontend`` picks how the model becomes a graph: ``"fx"`` (symbolic tracing), ``"export"``
    (torch.export at ``example_inputs``) or ``"auto"`` (fx, then export if it fails and
    ``example_inputs`` is given).

    ``example_inputs`` is a tuple of positional tensors, or a dict of keyword tensors for a
    model explained on a keyword input, e.g. ``{"inputs_embeds": e}`` for a Hugging Face text
    model (see ``embed_tokens``) or ``{"pixel_values": x}``. A dict is traced by torch.export
    (``"auto"`` goes straight to it); the compiled module's inputs take the keywords' names, so
    ``gm(e)`` and ``gm(inputs_embeds=e)`` both work. Structured outputs (a ``ModelOutput``,
    tuple or dict) come back in the model's structure; a key/value cache is not computed
    (``use_cache=False`` for the trace, where the forward takes it).
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
    if isinstance(example_inputs, dict):
        if frontend == "fx":
            raise LibraError(
                "keyword example_inputs (a dict) are traced by torch.export: use "
                "frontend='auto' or 'export', or pass the inputs as a positional tuple")
        graph = _stage("trace", model, lambda: export_trace(model, example_inputs))
        frontend = "export"
    else:
        graph, frontend = _stage("trace", model,
                                 lambda: trace_model(model, example_inputs, frontend))
    gm = _stage("canonicalisation", model, lambda: canonicalize(graph))
    rewrites = [r for rule in rules
                for r in _stage(f"rewrite ({rule.name} rule)", model, lambda rule=rule:
                                apply_rule(gm, rule))]

    def audit() -> RewriteReport:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        flow = Dataflow.of(gm)
        return RewriteReport(type(model).__name__, tuple(r.name for r in rules), rewrites,
                             certify(gm, flow), bias_sites(gm, flow), frontend)

    report = _stage("certification", model, audit)
    if not report.complete:
        listing = "; ".join(f"{v.node} ({v.op}) in {v.module or '<root>'}: {v.why}"
                            for v in report.violations)
        count = len(report.violations)
        if strict:
            raise UncertifiedError(
                f"cannot certify {report.model} complete: {count} op(s) break "
                f"FullGrad-completeness: {listing}. Add a rule for these ops, switch the "
                "missing rule on, or remove strict=True to get the uncertified graph."
            )
        warnings.warn(
            f"{report.model} is not certified complete ({count} violation(s)): {listing}; "
            "see the report.", LibraWarning, stacklevel=2)
    result = _stage("packaging", model, lambda: LibraGraphModule(
        gm, gm.graph, class_name=f"Libra{type(model).__name__}"))
    result.libra_report = report
    return result
