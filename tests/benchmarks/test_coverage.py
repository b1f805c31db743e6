"""The coverage sweep on a few tiny models: the per-model rows, the report, the worker pool."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks.coverage_pool import run_jobs
from benchmarks.coverage_report import render, write_report
from benchmarks.coverage_run import COMPLETE_TOL, describe_error, run_model
from libragrad_fx import TraceError

pytestmark = pytest.mark.bench  # see [tool.pytest.ini_options] markers

NUMERIC = ("timm:test_vit", "timm:test_convnext", "timm:test_resnet")
TRANSFORMERS = ("timm:test_vit", "timm:test_convnext")  # LayerNorm and GELU: incomplete as is
STATIC = ("open_clip:ViT-S-32", "timm:vit_tiny_patch16_224")
META = {"command": "pytest", "date": "today", "machine": "test", "workers": 1,
        "threads_per_worker": 1, "wall_seconds": 1.0, "rows_from_cache": 0,
        "param_cap": 120_000_000, "versions": {"torch": torch.__version__}}


@pytest.fixture(scope="module")
def rows() -> Iterator[dict[str, dict]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    found = {k: run_model(k, "numeric") for k in NUMERIC}
    found |= {k: run_model(k, "static") for k in STATIC}
    yield found
    torch.set_num_threads(threads)


@pytest.mark.parametrize("key", NUMERIC)
def test_numeric_row(rows: dict[str, dict], key: str) -> None:
    row = rows[key]
    assert row["status"] == "certified", row
    assert row["traced_by"] in ("fx", "export")
    assert row["forward_identical"] is True
    assert row["rel_error"] < COMPLETE_TOL and row["rel_error_f32"] < COMPLETE_TOL


@pytest.mark.parametrize("key", TRANSFORMERS)
def test_original_is_not_complete(rows: dict[str, dict], key: str) -> None:
    assert rows[key]["rel_error_original"] > 1e-3


@pytest.mark.parametrize("key", STATIC)
def test_static_row(rows: dict[str, dict], key: str) -> None:
    row = rows[key]
    assert row["status"] == "certified", row
    assert row["counts"]["attention"] == 12 and row["counts"]["gate"] == 12
    assert "rel_error" not in row


def test_failures_become_rows() -> None:
    row = run_model("timm:no_such_model", "numeric")
    assert row["status"] == "model error" and row["stage"] == "build"
    assert describe_error("transform", TraceError("x"), ours=True)["status"] == "libra error"
    assert describe_error("transform", KeyError("x"), ours=True)["status"] == "internal error"


def test_report_has_a_row_per_model(rows: dict[str, dict], tmp_path: Path) -> None:
    text = render(list(rows.values()), META)
    for row in rows.values():
        assert f"| `{row['name']}` | {row['tier']} |" in text
    assert "False certificates (certified, float64 relative error > 0.0001): **0**" in text
    md = write_report(list(rows.values()), META, tmp_path)
    assert md.read_text() == text + "\n" and (tmp_path / "coverage.json").exists()


def test_pool_turns_a_timeout_into_a_row(tmp_path: Path) -> None:
    results = []
    run_jobs([{"tier": "numeric", "key": "timm:vit_tiny_patch16_224"}], workers=1, threads=1,
             timeout=lambda job: 0.05, logdir=tmp_path,
             on_result=lambda job, result, failure: results.append((result, failure)))
    assert len(results) == 1
    result, failure = results[0]
    assert result is None and failure.startswith("timeout")
