"""Model -> torch.fx GraphModule.

The tracer steps into model code (timm, open_clip, the user's own modules) and keeps PyTorch's
built-in modules as leaves; canonicalisation turns those leaves into functional calls next.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch.fx as fx
from torch import nn

from ...errors import TraceError


def is_builtin_module(module: nn.Module) -> bool:
    """PyTorch's own layers (nn.Linear, nn.GELU, ...), but not its containers."""
    name = type(module).__module__
    builtin = name.startswith("torch.nn") or name.startswith("torch.ao.nn")
    return builtin and not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


class LibraTracer(fx.Tracer):
    """Symbolic tracer that remembers the innermost module being traced when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_builtin_module(m)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                path = self.path_of_module(m)
                self.failed_module = f"{path or '<root>'} ({type(m).__name__})"
            raise


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
