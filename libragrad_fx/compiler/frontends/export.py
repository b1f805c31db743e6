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
import inspect
import logging
import operator
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch._functorch.predispatch import _vmap_decrement_nesting, _vmap_increment_nesting
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from ...errors import TraceError
from .aten import to_canonical
from .blocks import inline
from .module_paths import copy_node, owner_stack
from .verify import check_reproduces

_STATE = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
# vmap's nesting calls (masks built with torch.vmap) return nothing the graph uses, but the
# ops between them run at the vmap level they set: dead-code elimination must keep them.
for _nesting in (_vmap_increment_nesting, _vmap_decrement_nesting):
    torch.fx.node.has_side_effect(_nesting)
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


def _trace_kwargs(model: nn.Module, kwargs: dict) -> dict:
    """The keyword inputs, plus ``use_cache=False`` where the forward takes ``use_cache``.

    A key/value cache is state for the next call, not part of the function being explained
    (torch.export cannot return one either): the trace runs without it. The user's model and
    its config are not touched; the compiled module's outputs simply have no cache entry.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    if "use_cache" in params and "use_cache" not in kwargs:
        return {**kwargs, "use_cache": False}
    return dict(kwargs)


def _export(model: nn.Module, args: tuple, kwargs: dict) -> ExportedProgram:
    """torch.export's program for ``model``, or a TraceError saying why there is none."""
    try:
        with _quiet_export():
            return _export_attempts(model, args, _trace_kwargs(model, kwargs))
    except Exception as exc:
        shapes = ", ".join([*(str(tuple(x.shape)) for x in args),
                            *(f"{k}={tuple(v.shape)}" for k, v in kwargs.items())])
        raise TraceError(
            f"cannot export {type(model).__name__} with torch.export at input shape(s) "
            f"{shapes}: {_reason(exc)}. {_HINT}"
        ) from exc


def _export_attempts(model: nn.Module, args: tuple, kwargs: dict) -> ExportedProgram:
    """Non-strict export, first with a symbolic batch dimension, then fully static."""
    tensors = [*args, *(v for v in kwargs.values() if isinstance(v, torch.Tensor))]
    if all(x.dim() > 0 and x.shape[0] >= 2 for x in tensors):
        def spec(value: Any) -> dict | None:
            return {0: Dim.AUTO} if isinstance(value, torch.Tensor) else None

        dynamic = (tuple(spec(x) for x in args), {k: spec(v) for k, v in kwargs.items()})
        try:
            bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
            shapes: Any = {name: spec(value) for name, value in bound.items()}
        except (TypeError, ValueError):
            shapes = dynamic[0] if not kwargs else dynamic
        try:
            return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
        except GuardOnDataDependentSymNode:  # about values: a static shape cannot help
            raise
        except Exception:  # noqa: BLE001, S110 - the static export reports its own failure
            pass
    return torch.export.export(model, args, kwargs, strict=False)


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
            if spec.kind is InputKind.USER_INPUT and isinstance(spec.arg, ConstantArgument):
                env[node] = spec.arg.value  # a Python constant the trace ran with (use_cache)
                continue
            if spec.kind is InputKind.USER_INPUT:
                new = graph.placeholder(node.name)
                new.meta = dict(node.meta)
            else:
                root[spec.target] = _state(model, ep, spec.target)
                new = graph.get_attr(spec.target)
                new.meta = {**node.meta, "nn_module_stack": owner_stack(model, spec.target)}
            env[node] = new
        elif node.op == "output":
            _output(graph, [env[n] if isinstance(n, fx.Node) else n for n in node.args[0]],
                    ep.call_spec.out_spec, model)
        elif node.target is operator.getitem and isinstance(env[node.args[0]], tuple):
            env[node] = env[node.args[0]][node.args[1]]  # an output of an inlined block
        else:
            if node.op == "get_attr":  # a submodule of a higher-order op
                root[node.target] = operator.attrgetter(node.target)(ep.graph_module)
            inlined = inline(graph, node, env, model, ep.graph_module, root)
            env[node] = inlined if inlined is not None else copy_node(graph, node, env, model)
    return fx.GraphModule(root, graph, class_name=type(model).__name__)


def _plain(spec: pytree.TreeSpec) -> bool:
    """True when the output structure is a tensor, or tuples, lists and dicts of tensors."""
    return spec.is_leaf() or (spec.type in (tuple, list, dict)
                              and all(_plain(c) for c in spec.children()))


def _output(graph: fx.Graph, flat: list, out_spec: pytree.TreeSpec, model: nn.Module) -> None:
    """The graph's output in the structure the model returns.

    A tensor, tuple, list or dict is written into the output node as it is. Any other
    registered pytree (a ``ModelOutput`` dataclass, say) is returned through fx's pytree
    codegen: the graph outputs the flat tensors and the generated forward rebuilds the object,
    so ``type(gm(x)) is type(model(x))`` and fields that were None stay None.
    """
    out = pytree.tree_unflatten(flat, out_spec)
    if _plain(out_spec):
        graph.output(out)
        return
    if not all(isinstance(v, fx.Node) or v is None for v in flat):
        raise TraceError(
            f"{type(model).__name__} returns a {type(out).__name__} holding values that are "
            "not tensors; the export frontend handles tensors in a tuple, list, dict or "
            "registered pytree (a ModelOutput). Wrap the model so that its forward returns one."
        )
    graph.output(tuple(flat))
    names = [n.name for n in graph.nodes if n.op == "placeholder"]
    in_spec = pytree.tree_flatten(list(names))[1]
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, in_spec, out_spec))


def _check_keywords(model: nn.Module, kwargs: dict) -> None:
    """A TraceError naming the forward's parameters when it takes none of these keywords."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise TraceError(
            f"{type(model).__name__}.forward takes no keyword {', '.join(map(repr, unknown))}; "
            f"its parameters are: {', '.join(params)}. Pass example_inputs keyed by one of "
            "them; a model that takes token ids only is explained from their embeddings with "
            "example_inputs={'input_ids': ids} and from_embeddings=True."
        )


def export_trace(model: nn.Module, example_inputs: tuple | dict) -> fx.GraphModule:
    """Export ``model`` at ``example_inputs`` and express the graph in the canonical vocabulary.

    ``example_inputs`` is a tuple of positional tensors or a dict of keyword tensors
    (``{"inputs_embeds": e}``); the graph's placeholders take the names export gives them (the
    keyword's name for a keyword input). The model is not modified: the graph refers to its
    parameters and buffers.
    """
    keyword = isinstance(example_inputs, dict)
    args, kwargs = ((), dict(example_inputs)) if keyword else (tuple(example_inputs), {})
    values = list(kwargs.items()) if keyword else list(enumerate(args))
    wrong = [f"{i}: {type(x).__name__}" for i, x in values if not isinstance(x, torch.Tensor)]
    if not values or wrong:
        raise TraceError(
            f"the torch.export frontend needs example_inputs as a non-empty tuple of tensors "
            f"or a dict of keyword tensors, got {', '.join(wrong) or 'nothing'}. Wrap the "
            "model so that its forward takes tensors only."
        )
    _check_keywords(model, kwargs)
    ep = _export(model, args, kwargs)
    try:
        gm = to_canonical(_rebuild(model, ep))
    except TraceError:
        raise
    except Exception as exc:
        raise TraceError(
            f"torch.export traced {type(model).__name__}, but its graph could not be rebuilt "
            f"for the rewrite: {_reason(exc)}. Use frontend='fx' if the model allows it, and "
            "report this as a libragrad_fx bug."
        ) from exc
    check_reproduces(model, gm, args, _trace_kwargs(model, kwargs))
    return gm
