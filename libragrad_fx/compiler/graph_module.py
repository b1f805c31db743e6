"""LibraGraphModule: the GraphModule handed back to users, with its report and input checks.

It persists as what it is. fx pickles a GraphModule as its generated code and re-traces that
code on load, which cannot work here: the code calls LibraGrad's runtime ops, whose autograd
Functions do not take tracer proxies. So pickle, ``torch.save`` and ``copy.deepcopy`` carry the
graph itself (node metadata reduced to the module paths, which attribution reads; export's fake
tensors do not pickle), the modules and tensors it refers to, and the report. The graph is
pickled on its own, by a pickler that writes ATen operators (which do not pickle) by name.
"""

from __future__ import annotations

import copy
import copyreg
import io
import pickle
import re

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _copy_attr

from ..errors import InputError, LibraError
from .input_check import check_call
from .report import RewriteReport


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} ({value.dtype})"
    return type(value).__name__


def failure_reason(exc: Exception) -> str:
    """The last line of the message (before fx's "While executing" trailer), without the
    tracer's placeholders baked into it."""
    text = str(exc).split("While executing")[0].strip()
    text = text.splitlines()[-1] if text else type(exc).__name__
    return re.sub(r"Proxy\(\w+\)", "...", text).rstrip(".")


def _portable(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` that pickles: the same nodes and codegen, and of the metadata only
    the module stack, its classes by name (a class defined in a function does not pickle)."""
    out = fx.Graph()
    out.output(out.graph_copy(graph, {}))
    out._codegen = graph._codegen
    for node in out.nodes:
        stack = node.meta.get("nn_module_stack")
        node.meta = {} if stack is None else {"nn_module_stack": type(stack)(
            (key, (path, getattr(kind, "__qualname__", str(kind))))
            for key, (path, kind) in stack.items())}
    return out


def _aten(namespace: str, name: str, overload: str) -> torch._ops.OpOverload:
    return getattr(getattr(getattr(torch.ops, namespace), name), overload)


def _op_by_name(op: torch._ops.OpOverload) -> tuple:
    return _aten, (op.namespace, op._opname, op._overloadname)


def _graph_bytes(graph: fx.Graph) -> bytes:
    """``graph`` pickled, metadata reduced, ATen operators written by name."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer)
    pickler.dispatch_table = {**copyreg.dispatch_table, torch._ops.OpOverload: _op_by_name}
    pickler.dump(_portable(graph))
    return buffer.getvalue()


def _restore(root: nn.Module, graph: bytes, class_name: str,
             report: RewriteReport) -> LibraGraphModule:
    """The unpickled module: the graph over ``root``'s modules and tensors, eval mode."""
    gm = LibraGraphModule(root, pickle.loads(graph), class_name=class_name).eval()
    gm.libra_report = report
    return gm


class LibraGraphModule(fx.GraphModule):
    """A rewritten model: the original forward, LibraGrad's backward, and ``libra_report``.

    Calls that fail inside the graph are re-raised as ``InputError`` naming what was passed,
    since an input the model does not accept (wrong shape, dtype or rank) is by far the most
    common cause; the original exception is chained for the details.
    """

    libra_report: RewriteReport

    def __reduce__(self):
        root = nn.Module()
        for node in self.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                _copy_attr(self, root, node.target)
        return (_restore, (root, _graph_bytes(self.graph), type(self).__name__,
                           self.libra_report))

    def __deepcopy__(self, memo: dict) -> LibraGraphModule:
        res = super().__deepcopy__(memo)
        type(res).__name__ = type(self).__name__
        res.libra_report = copy.deepcopy(self.libra_report, memo)
        return res.eval()

    def __call__(self, *args, **kwargs):
        if not args and not kwargs:
            raise InputError(f"{self.libra_report.model} expects an input tensor; got none")
        check_call([*args, *kwargs.values()], f"the transformed {self.libra_report.model}")
        try:
            return super().__call__(*args, **kwargs)
        except LibraError:
            raise
        except Exception as exc:
            given = ", ".join(_describe(a) for a in (*args, *kwargs.values()))
            reason = failure_reason(exc)
            raise InputError(
                f"the transformed {self.libra_report.model} could not run on {given}: "
                f"{reason}. Pass the input the original model accepts (for an image model, "
                "(batch, channels, height, width) at the size it was built for)."
            ) from exc
