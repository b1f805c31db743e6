"""Model -> torch.fx GraphModule.

The tracer steps into model code (timm, open_clip, the user's own modules) and keeps PyTorch's
built-in modules as leaves; canonicalisation turns those leaves into functional calls next.

It also steps into functions that libraries registered with ``torch.fx.wrap`` (torchvision's
``stochastic_depth`` and ``_patch_merging_pad``, timm's ``maybe_add_mask``): fx keeps those as
opaque calls, which the certificate cannot see into, although most of them trace fine (in eval
``stochastic_depth`` is ``return input``). A wrapped function with an op-table record stays a
call; one whose body cannot be traced (control flow on shapes, as in torchvision's
``shifted_window_attention``) is rolled back and stays opaque, and ``trace_model`` then prefers
the export frontend (``opaque_calls``).
"""

from __future__ import annotations

import builtins
import copy
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.fx as fx
import torch.fx._symbolic_trace as fx_trace
from torch import nn

from ...errors import TraceError
from .. import optable
from ..dataflow import Dataflow


def is_builtin_module(module: nn.Module) -> bool:
    """PyTorch's own layers (nn.Linear, nn.GELU, ...), but not its containers."""
    name = type(module).__module__
    builtin = name.startswith("torch.nn") or name.startswith("torch.ao.nn")
    return builtin and not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _wrapped_functions() -> frozenset[Callable]:
    """The functions registered with ``torch.fx.wrap`` (read, never changed: fx keeps the
    registry as module state; a function fx has patched for a trace running elsewhere is seen
    through its ``__wrapped__`` chain)."""
    found: set[Callable] = set()
    registry = getattr(fx_trace, "_wrapped_fns_to_patch", {})
    for (_, name), frame in dict(registry).items():
        fn = frame.get(name, getattr(builtins, name, None))
        while callable(fn):
            found.add(fn)
            fn = getattr(fn, "__wrapped__", None)
    return frozenset(found)


class LibraTracer(fx.Tracer):
    """Symbolic tracer that steps into fx-wrapped functions it can trace, and remembers the
    innermost module being traced when tracing fails.

    Stepping in needs no change to torch's global state: fx's wrapper of a wrapped function
    asks the tracer to record a call (``create_proxy``), and this tracer runs the function on
    the proxies instead. The state is per tracer, so concurrent traces do not interfere.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failed_module: str | None = None
        self._wrapped: frozenset[Callable] = frozenset()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_builtin_module(m)

    def trace(self, root: Any, concrete_args: dict | None = None) -> fx.Graph:
        self._wrapped = _wrapped_functions()
        graph = super().trace(root, concrete_args)
        for node in graph.nodes:  # fx marks what a wrapped call returned: only leaves keep it
            if node.meta.get("is_wrapped") and node.target not in self._wrapped:
                del node.meta["is_wrapped"]
        return graph

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, *rest: Any,
                     **options: Any) -> fx.Proxy:
        if kind == "call_function" and self._steps_into(target):
            inlined = self._trace_into(target, args, kwargs)
            if inlined is not None:
                return inlined
        return super().create_proxy(kind, target, args, kwargs, *rest, **options)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                path = self.path_of_module(m)
                self.failed_module = f"{path or '<root>'} ({type(m).__name__})"
            raise

    def _steps_into(self, target: Any) -> bool:
        return (inspect.isfunction(target) and target in self._wrapped
                and optable.record(target) is None)

    def _trace_into(self, fn: Callable, args: tuple, kwargs: dict) -> fx.Proxy | None:
        """``fn`` run on the proxies, its ops recorded; None (and nothing recorded) when its
        body cannot be traced or it does not return one tensor."""
        last, failed = _last(self.graph), self.failed_module
        try:
            out = fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the call is kept opaque instead
            out = None
        if isinstance(out, fx.Proxy) and out.tracer is self:
            return out
        self.failed_module = failed
        while (node := _last(self.graph)) is not last:
            self.graph.erase_node(node)
        return None


def _last(graph: fx.Graph) -> fx.Node | None:
    return next(iter(reversed(graph.nodes)), None)


@contextmanager
def _state_kept(model: nn.Module) -> Iterator[None]:
    """Put back every module's attributes after tracing.

    Tracing runs the forward on proxies, and a model that caches in its forward (a dict of
    precomputed attention biases, a flag) would keep a proxy in itself: the user's model would
    be changed and a second trace would fail.
    """
    saved = []
    for module in model.modules():
        attrs = dict(vars(module))
        contents = {k: copy.copy(v) for k, v in attrs.items() if isinstance(v, (dict, list, set))}
        saved.append((module, attrs, contents))
    try:
        yield
    finally:
        for module, attrs, contents in saved:
            state = vars(module)
            for key in [k for k in state if k not in attrs]:
                del state[key]
            state.update(attrs)
            for key, content in contents.items():
                container = attrs[key]
                container.clear()
                if isinstance(container, list):
                    container.extend(content)
                else:
                    container.update(content)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; raise TraceError naming the module and the reason."""
    tracer = LibraTracer()
    with _state_kept(model):
        try:
            graph = tracer.trace(model)
        except Exception as exc:
            where = tracer.failed_module or f"<root> ({type(model).__name__})"
            raise TraceError(
                f"cannot trace {type(model).__name__}: symbolic tracing failed in module "
                f"{where}: {type(exc).__name__}: {exc}. Data-dependent Python control flow (an "
                "`if` or a loop on tensor values or shapes) cannot be traced; rewrite it with "
                "tensor ops, or pass the affected submodule separately."
            ) from exc
        # Built inside: it copies the tensor constants the tracer stored on the root.
        return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)


def opaque_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """Calls of fx-wrapped functions that stayed opaque and no op-table record covers, on the
    input's gradient path: the certificate can only report them, while torch.export runs
    their code and so records their ops."""
    flow = Dataflow.of(gm)
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.meta.get("is_wrapped")
            and optable.record(n.target) is None and flow.depends_on_input(n)]
