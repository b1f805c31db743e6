"""One model of the coverage sweep: transform it, read the certificate, measure completeness.

``run_model(key, tier)`` returns one row (a JSON-able dict). The static tier builds the model on
the meta device (no memory, no data) and reads the rewrites and the certificate; the numeric
tier builds it with random weights and also checks the forward and measures the completeness
error in float64. Nothing raised by one model escapes: every failure becomes the row's status.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

import libragrad_fx
from benchmarks.coverage_hf import KeywordCall
from benchmarks.coverage_models import (
    build,
    count_params,
    family,
    is_named,
    split_key,
    target_kind,
)

COMPLETE_TOL = 1e-4  # relative completeness error above which a certificate is false
PERTURB = 0.02
BATCH = 1
MAX_VIOLATIONS = 5


class Failed(Exception):
    """A stage of the run failed; carries the row fields describing why."""

    def __init__(self, stage: str, exc: BaseException, *, ours: bool) -> None:
        super().__init__(f"{stage}: {exc}")
        self.fields = describe_error(stage, exc, ours=ours)


def describe_error(stage: str, exc: BaseException, *, ours: bool) -> dict[str, Any]:
    """Row fields for an exception: a LibraError is deliberate, anything else from libragrad_fx
    is an internal error, and a failure of the model itself (``ours=False``) a model error."""
    if isinstance(exc, libragrad_fx.LibraError):
        status = "libra error"
    else:
        status = "internal error" if ours else "model error"
    frames = traceback.extract_tb(exc.__traceback__)
    ours_frames = [f for f in frames if "/libragrad_fx/" in f.filename]
    frame = (ours_frames or frames or [None])[-1]  # the deepest frame in libragrad_fx
    where = f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno} {frame.name}" if frame else ""
    return {"status": status, "stage": stage, "error_type": type(exc).__name__,
            "error": str(exc)[:2000], "error_where": where}


def _stage(row: dict, stage: str, fn: Callable[[], Any], *, ours: bool) -> Any:
    """``fn()``, its seconds added to ``row["timings"][stage]``, its exception classified."""
    start = time.perf_counter()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - classified into the row
        raise Failed(stage, exc, ours=ours) from exc
    finally:
        timings = row.setdefault("timings", {})
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 2)


def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Add 0.02 * N(0, 1) to every parameter (timm zero-initialises some heads)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(PERTURB * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


def _first_tensor(output: Any) -> Tensor:
    leaves = [t for t in tree_leaves(output) if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError(f"the model returned no tensor ({type(output).__name__})")
    return leaves[0]


def make_target(output: Any, kind: str) -> tuple[Callable[[Any], Tensor], str]:
    """The explained score: the argmax class of a classifier (at the last position for a causal
    LM), feature 0 of an embedding; ``kind`` is coverage_models.target_kind's."""
    y = _first_tensor(output)
    if kind == "last token" and y.dim() == 3:
        tok = int(y[0, -1].argmax())
        return (lambda out: _first_tensor(out)[:, -1, tok]), f"last token, class {tok}"
    if kind == "class" and y.dim() == 2 and y.shape[1] > 1:
        cls = int(y[0].argmax())
        return (lambda out: _first_tensor(out)[:, cls]), f"class {cls}"
    return (lambda out: _first_tensor(out).flatten(1)[:, 0]), "output[:, 0]"


def same_output(a: Any, b: Any) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(x, y) if isinstance(x, Tensor) else x == y for x, y in zip(la, lb, strict=True))


def _report_fields(gm: nn.Module) -> dict[str, Any]:
    report = gm.libra_report
    violations = list(report.violations)
    return {
        "traced_by": report.frontend,
        "counts": dict(report.counts),
        "certified": bool(report.complete),
        "n_violations": len(violations),
        "violations": [{"node": v.node, "module": v.module, "op": v.op, "why": v.why}
                       for v in violations[:MAX_VIOLATIONS]],
        "bias_sites": len(report.bias_sites),
    }


def _as_the_user_has_it(model: nn.Module) -> tuple[nn.Module, str | None]:
    """An HF model (the sweep calls it through ``KeywordCall``) goes to the library as it is,
    with its keyword: ``example_inputs={"inputs_embeds": x}``, ``input_name=...``."""
    if isinstance(model, KeywordCall):
        return model.model, model.keyword
    return model, None


def _transform(model: nn.Module, x: Tensor) -> nn.Module:
    model, keyword = _as_the_user_has_it(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = (x,) if keyword is None else {keyword: x}
        return libragrad_fx.libra_transform(model, example_inputs=example, frontend="auto")


def _relative(model_or_gm: nn.Module, x: Tensor, target: Callable) -> float:
    model_or_gm, keyword = _as_the_user_has_it(model_or_gm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = libragrad_fx.completeness_error(model_or_gm, x, target, input_name=keyword)
    return float(result.relative.max())


def _static(key: str, row: dict[str, Any]) -> None:
    model, size = _stage(row, "build", lambda: build(key, "meta"), ours=False)
    row.update(params=count_params(model), input_size=list(size))
    x = torch.empty(BATCH, *size, device="meta")
    gm = _stage(row, "transform", lambda: _transform(model, x), ours=True)
    row.update(_report_fields(gm))


def _numeric(key: str, row: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model, size = _stage(row, "build", lambda: build(key, "cpu"), ours=False)
    perturb_(model)
    row.update(params=count_params(model), input_size=list(size))
    x = torch.randn(BATCH, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_ng = _stage(row, "forward", lambda: model(x), ours=False)
    ref = _stage(row, "forward", lambda: model(x), ours=False)
    gm = _stage(row, "transform", lambda: _transform(model, x), ours=True)
    row.update(_report_fields(gm))
    out = _stage(row, "forward_transformed", lambda: gm(x), ours=True)
    with torch.no_grad():
        out_ng = _stage(row, "forward_transformed", lambda: gm(x), ours=True)
    row["forward_identical"] = same_output(ref, out) and same_output(ref_ng, out_ng)
    target, row["target"] = make_target(ref, target_kind(key))
    row["rel_error_f32"] = _stage(
        row, "completeness_float32", lambda: _relative(gm, x, target), ours=True)
    # float64 separates rounding from real violations: measure the rewritten and the original
    model64, x64 = model.double(), x.double()
    gm64 = _stage(row, "transform_float64", lambda: _transform(model64, x64), ours=True)
    row["rel_error"] = _stage(row, "completeness", lambda: _relative(gm64, x64, target), ours=True)
    row["rel_error_original"] = _stage(
        row, "completeness_original", lambda: _relative(model64, x64, target), ours=True)


def run_model(key: str, tier: str) -> dict[str, Any]:
    """The sweep's row for one model (``tier`` is ``static`` or ``numeric``); never raises."""
    source, name = split_key(key)
    row: dict[str, Any] = {"key": key, "tier": tier, "source": source, "name": name,
                           "traced_by": None, "certified": None}
    start = time.perf_counter()
    try:
        row.update(family=family(key), named=is_named(key))
        (_static if tier == "static" else _numeric)(key, row)
        row["status"] = "certified" if row["certified"] else "uncertified"
    except Failed as failure:
        row.update(failure.fields)
        if failure.fields["error_type"] == "NoSmallConfig":  # coverage_hf: not ours, not run
            row["status"] = "no small config"
        if failure.fields["stage"] == "transform":
            traced = failure.fields["error_type"] == "TraceError"
            row["traced_by"] = "failed" if traced else "unknown"
    except Exception as exc:  # noqa: BLE001 - a bug of the harness, still one row
        row.update(describe_error("harness", exc, ours=False), status="harness error")
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row
