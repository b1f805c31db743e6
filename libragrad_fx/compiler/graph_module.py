"""LibraGraphModule: the GraphModule handed back to users, with its report and input checks."""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from ..errors import InputError, LibraError
from .report import RewriteReport


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} ({value.dtype})"
    return type(value).__name__


def _reason(exc: Exception) -> str:
    """The last line of the message, without the tracer's placeholders baked into it."""
    text = str(exc).strip()
    text = text.splitlines()[-1] if text else type(exc).__name__
    return re.sub(r"Proxy\(\w+\)", "...", text).rstrip(".")


class LibraGraphModule(fx.GraphModule):
    """A rewritten model: the original forward, LibraGrad's backward, and ``libra_report``.

    Calls that fail inside the graph are re-raised as ``InputError`` naming what was passed,
    since an input the model does not accept (wrong shape, dtype or rank) is by far the most
    common cause; the original exception is chained for the details.
    """

    libra_report: RewriteReport

    def __call__(self, *args, **kwargs):
        if not args and not kwargs:
            raise InputError(f"{self.libra_report.model} expects an input tensor; got none")
        try:
            return super().__call__(*args, **kwargs)
        except LibraError:
            raise
        except Exception as exc:
            given = ", ".join(_describe(a) for a in (*args, *kwargs.values()))
            reason = _reason(exc)
            raise InputError(
                f"the transformed {self.libra_report.model} could not run on {given}: "
                f"{reason}. Pass the input the original model accepts (for an image model, "
                "(batch, channels, height, width) at the size it was built for)."
            ) from exc
