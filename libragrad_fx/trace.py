"""Model -> torch.fx GraphModule.

The tracer steps into model code (timm, open_clip, the user's own modules) and keeps PyTorch's
built-in modules as leaves; canonicalisation turns those leaves into functional calls next.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .errors import TraceError


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


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; raise TraceError naming the module and the reason."""
    tracer = LibraTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = tracer.failed_module or f"<root> ({type(model).__name__})"
        raise TraceError(
            f"cannot trace {type(model).__name__}: symbolic tracing failed in module {where}: "
            f"{type(exc).__name__}: {exc}. Data-dependent Python control flow (an `if` or a "
            "loop on tensor values or shapes) cannot be traced; rewrite it with tensor ops, "
            "or pass the affected submodule separately."
        ) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, class_name=name)
