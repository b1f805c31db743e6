"""Model -> fx.GraphModule through torch.export, for models symbolic tracing cannot handle.

torch.export runs the forward once on example inputs (on fake tensors), so Python control flow
on shapes is resolved instead of failing as it does under symbolic tracing. The graph it records
is rebuilt here as a plain GraphModule: the model's own parameters and buffers as ``get_attr``
nodes (shared, never copied), the example inputs as positional placeholders, no pytree or guard
code. Its ATen calls are then put into the canonical vocabulary (``export_ops``), its module
stacks into the fx frontend's dotted paths, and ``with torch.no_grad():`` blocks are inlined
with detached outputs, so the rules and the report see the same graph either way.

The graph is specialised to the example's shapes, except the leading (batch) dimension, which
stays symbolic when the example has at least two samples and the model allows it.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import re
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from ...errors import TraceError
from .aten import to_canonical

_STATE = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
_SET_GRAD = torch.ops.higher_order.wrap_with_set_grad_enabled
_NOISY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export")
_HINT = (
    "torch.export runs the forward once on the example inputs: control flow must depend on "
    "shapes, not on tensor values (compute both branches and pick with torch.where), and every "
    "input must be a tensor. Pass inputs the model accepts, or transform the affected "
    "submodule separately."
)


def _reason(exc: BaseException) -> str:
    """The exception's type and first line, and the user's line that raised it if torch says."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    calls = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s+(.+)', text)
    if calls:
        file, line, function, code = calls[-1]
        reason += f" (raised at {file}:{line} in {function}: `{code.strip()}`)"
    return reason


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Mute torch's own warnings about a failed export: the TraceError says why, once."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export(model: nn.Module, inputs: tuple) -> ExportedProgram:
    """torch.export's program for ``model``, or a TraceError saying why there is none."""
    try:
        with _quiet_export():
            return _export_attempts(model, inputs)
    except Exception as exc:
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        raise TraceError(
            f"cannot export {type(model).__name__} with torch.export at input shape(s) "
            f"{shapes}: {_reason(exc)}. {_HINT}"
        ) from exc


def _export_attempts(model: nn.Module, inputs: tuple) -> ExportedProgram:
    """Non-strict export, first with a symbolic batch dimension, then fully static."""
    if all(x.dim() > 0 and x.shape[0] >= 2 for x in inputs):
        try:
            dynamic = tuple({0: Dim.AUTO} for _ in inputs)
            return torch.export.export(model, inputs, strict=False, dynamic_shapes=dynamic)
        except GuardOnDataDependentSymNode:  # about values: a static shape cannot help
            raise
        except Exception:  # noqa: BLE001, S110 - the static export reports its own failure
            pass
    return torch.export.export(model, inputs, strict=False)


def _clean_path(path: str) -> str:
    """A dotted module path ('blocks.0.attn') from dynamo's spellings ("L['self'].blocks[0]")."""
    path = re.sub(r"^(L\['self'\]|L__self__)(?=[.\[]|$)", "", str(path))
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^'\"\]]*)['\"]?\]", r".\1", path)
    return path.strip(".")


def _module_stack(model: nn.Module, stack: dict | None) -> OrderedDict:
    """The fx frontend's form: ``{path: (path, module class)}``, the root left out."""
    out = OrderedDict()
    for value in (stack or {}).values():
        path = _clean_path(value[0])
        if path:
            try:
                kind = type(model.get_submodule(path))
            except AttributeError:
                kind = value[1]
            out[path] = (path, kind)
    return out


def _owner_stack(model: nn.Module, target: str) -> OrderedDict:
    """The module stack of a parameter or buffer: its owning module and the ones above it."""
    parts = target.split(".")[:-1]
    paths = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return _module_stack(model, {p: (p, None) for p in paths})


def _state(model: nn.Module, ep: ExportedProgram, target: str) -> Any:
    """The model's own tensor for ``target`` (shared), else the one export lifted."""
    try:
        value = operator.attrgetter(target)(model)
    except AttributeError:
        value = None
    if isinstance(value, torch.Tensor):
        return value
    return ep.constants[target] if target in ep.constants else ep.state_dict[target]


def _rebuild(model: nn.Module, ep: ExportedProgram) -> fx.GraphModule:
    """A plain GraphModule over the exported graph, parameters as the model's own tensors."""
    sig = ep.graph_signature
    graph, env, root = fx.Graph(), {}, {}
    specs = {spec.arg.name: spec for spec in sig.input_specs}
    bad = [s for s in sig.output_specs if s.kind is not OutputKind.USER_OUTPUT]
    if bad or any(s.kind not in (*_STATE, InputKind.USER_INPUT) for s in specs.values()):
        kinds = sorted({s.kind.name for s in (*bad, *specs.values())} - {"USER_OUTPUT"})
        raise TraceError(
            f"cannot use the torch.export graph of {type(model).__name__}: it has state the "
            f"frontend does not support ({', '.join(kinds)}; e.g. a buffer the forward "
            "mutates). Make the forward free of side effects, or use frontend='fx'."
        )
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            spec = specs[node.name]
            if spec.kind is InputKind.USER_INPUT:
                new = graph.placeholder(node.name)
                new.meta = dict(node.meta)
            else:
                root[spec.target] = _state(model, ep, spec.target)
                new = graph.get_attr(spec.target)
                new.meta = {**node.meta, "nn_module_stack": _owner_stack(model, spec.target)}
            env[node] = new
        elif node.op == "output":
            flat = [env[n] if isinstance(n, fx.Node) else n for n in node.args[0]]
            out = pytree.tree_unflatten(flat, ep.call_spec.out_spec)
            if not isinstance(out, (fx.Node, tuple, list, dict)):
                raise TraceError(
                    f"{type(model).__name__} returns a {type(out).__name__}; the export "
                    "frontend handles a tensor, or a tuple, list or dict of tensors. Wrap the "
                    "model so that its forward returns one."
                )
            graph.output(out)
        elif node.target is operator.getitem and isinstance(env[node.args[0]], tuple):
            env[node] = env[node.args[0]][node.args[1]]  # an output of an inlined block
        else:
            if node.op == "get_attr":  # a submodule of a higher-order op
                root[node.target] = operator.attrgetter(node.target)(ep.graph_module)
            inlined = _inline_no_grad(graph, node, env, model, ep.graph_module)
            env[node] = inlined if inlined is not None else _copy(graph, node, env, model)
    return fx.GraphModule(root, graph, class_name=type(model).__name__)


def _copy(graph: fx.Graph, node: fx.Node, env: dict, model: nn.Module) -> fx.Node:
    new = graph.node_copy(node, lambda n: env[n])
    if "nn_module_stack" in node.meta:
        new.meta["nn_module_stack"] = _module_stack(model, node.meta["nn_module_stack"])
    return new


def _inline_no_grad(
    graph: fx.Graph, node: fx.Node, env: dict, model: nn.Module, owner: nn.Module
) -> tuple | None:
    """A ``with torch.no_grad():`` block, inlined with its outputs detached (the same values).

    Export keeps such a block as a higher-order op around a subgraph, which the rules and the
    certificate cannot see into; inlined, its ops are visible and its outputs are constants.
    """
    if not (node.op == "call_function" and node.target is _SET_GRAD and node.args[0] is False):
        return None
    block = operator.attrgetter(node.args[1].target)(owner)
    if any(n.op == "get_attr" for n in block.graph.nodes):
        return None  # nested blocks or constants of its own: left as it is
    inner, inputs = {}, iter(node.args[2:])
    for n in block.graph.nodes:
        if n.op == "placeholder":
            value = next(inputs)
            inner[n] = env[value] if isinstance(value, fx.Node) else value
        elif n.op == "output":
            outputs = n.args[0]
        else:
            inner[n] = _copy(graph, n, inner, model)
    detached = []
    for value in outputs:
        if isinstance(value, fx.Node):
            new = graph.call_function(torch.detach, (inner[value],))
            new.meta = dict(inner[value].meta)
            detached.append(new)
        else:
            detached.append(value)
    return tuple(detached)


def export_trace(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """Export ``model`` at ``example_inputs`` and express the graph in the canonical vocabulary.

    The model is not modified: the graph refers to its parameters and buffers.
    """
    inputs = tuple(example_inputs)
    wrong = [f"{i}: {type(x).__name__}" for i, x in enumerate(inputs)
             if not isinstance(x, torch.Tensor)]
    if not inputs or wrong:
        raise TraceError(
            f"the torch.export frontend needs example_inputs as a non-empty tuple of tensors, "
            f"got {', '.join(wrong) or 'an empty tuple'}. Wrap the model so that its forward "
            "takes tensors only."
        )
    ep = _export(model, inputs)
    try:
        gm = _rebuild(model, ep)
        return to_canonical(gm)
    except TraceError:
        raise
    except Exception as exc:
        raise TraceError(
            f"torch.export traced {type(model).__name__}, but its graph could not be rebuilt "
            f"for the rewrite: {_reason(exc)}. Use frontend='fx' if the model allows it, and "
            "report this as a libragrad_fx bug."
        ) from exc
