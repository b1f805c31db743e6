"""libra_transform: trace -> canonicalise -> match and rewrite, rule by rule -> certify."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
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
from .frontends.embeddings import cut_at_embeddings, integer_input
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


# Tracing runs on process-wide state that is not thread-safe: fx's patcher of wrapped
# functions (CURRENT_PATCHER) and torch.export's tracing and fake-tensor modes. Two threads
# compiling at once fail inside torch, so the trace stage holds this lock; everything after it
# works on the graph of its own call.
_TRACING = threading.RLock()


def _trace(model: nn.Module, example_inputs: tuple | dict | None, frontend: str,
           from_embeddings: bool) -> tuple[fx.GraphModule, str]:
    """The trace stage: the model as a graph (cut at its embeddings if asked), its frontend."""
    if isinstance(example_inputs, dict):
        if frontend == "fx":
            raise LibraError(
                "keyword example_inputs (a dict) are traced by torch.export: use "
                "frontend='auto' or 'export', or pass the inputs as a positional tuple")
        token_ids = integer_input(example_inputs) if from_embeddings else None
        traced = _stage("trace", model, lambda: export_trace(model, example_inputs))
        graph = traced if token_ids is None else _stage(
            "embedding cut", model, lambda: cut_at_embeddings(traced, *token_ids))
        frontend = "export"
    else:
        graph, frontend = _stage("trace", model,
                                 lambda: trace_model(model, example_inputs, frontend))
    return graph, frontend


def libra_transform(
    model: nn.Module,
    *,
    rules: Sequence[Rule] | None = None,
    strict: bool = False,
    example_inputs: tuple | dict | None = None,
    frontend: str = "auto",
    from_embeddings: bool = False,
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

    ``from_embeddings=True`` explains a model that takes only token ids from their embeddings:
    ``example_inputs={"input_ids": ids}``, and the compiled module takes
    ``embed_tokens(model, ids)`` for those ids (frontends/embeddings.py says how).
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
    if isinstance(example_inputs, torch.Tensor):
        raise LibraError("example_inputs is a tuple of tensors (or a dict of keyword tensors): "
                         "pass (x,), not x")
    rules = tuple(libra() if rules is None else rules)
    wrong = [r for r in rules if not isinstance(r, Rule)]
    if wrong:
        raise LibraError(
            f"rules takes Rule objects, got {wrong[0]!r}; pick them with the preset's switches, "
            "e.g. rules=libra(norm=False), or from libragrad_fx.rules.ALL_RULES")
    if from_embeddings and not isinstance(example_inputs, dict):
        raise LibraError("from_embeddings=True needs example_inputs={'input_ids': ids}, the "
                         "token ids whose embeddings are explained")
    with _TRACING:
        graph, frontend = _trace(model, example_inputs, frontend, from_embeddings)
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
    # eval(): the module containers fx creates along the paths to the model's own (eval)
    # modules start in training mode; the model's modules are eval already, so nothing of
    # theirs changes
    result = _stage("packaging", model, lambda: LibraGraphModule(
        gm, gm.graph, class_name=f"Libra{type(model).__name__}").eval())
    result.libra_report = report
    return result
