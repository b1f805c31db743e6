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


# --- Hugging Face and torchvision sections ---------------------------------------------------

HF_TINY = ("LlamaForCausalLM", "BertForSequenceClassification", "ViTForImageClassification")


@pytest.mark.parametrize("name", HF_TINY)
def test_hf_config_shrinks_and_builds(name: str) -> None:
    from benchmarks.coverage_hf import _model_class, build, tiny_config

    default = _model_class(name).config_class()
    config = tiny_config(name)
    assert config.hidden_size < default.hidden_size and config.hidden_size <= 32
    assert config.num_hidden_layers <= 2 < default.num_hidden_layers
    assert config._attn_implementation == "eager"
    model, size = build(name)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    x = torch.randn(1, *size)
    assert "logits" in model(x)  # the wrapper passes the one tensor by its keyword
    expected = ("pixel_values" if "Image" in name else "inputs_embeds")
    assert model.keyword == expected


def test_hf_sdpa_rows_only_for_named_families() -> None:
    from benchmarks.coverage_hf import classes, keys

    found = keys()
    assert "hf:LlamaForCausalLM@sdpa" in found and "hf:LlamaForCausalLM" in found
    assert len([k for k in found if "@" not in k]) == len(classes())
    assert not any(k.endswith("@sdpa") and "Bloom" in k for k in found)


def test_hf_class_that_does_not_build_is_its_own_outcome() -> None:
    row = run_model("hf:NoSuchModelForCausalLM", "numeric")
    assert row["status"] == "no small config" and row["stage"] == "build", row


@pytest.fixture(scope="module")
def new_rows() -> Iterator[dict[str, dict]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    keys = ("hf:ViTForImageClassification", "hf:BertForSequenceClassification",
            "torchvision:squeezenet1_1")
    yield {k: run_model(k, "numeric") for k in keys}
    torch.set_num_threads(threads)


def test_hf_and_torchvision_rows(new_rows: dict[str, dict]) -> None:
    from benchmarks.coverage_report import is_false_certificate

    for row in new_rows.values():
        assert row["status"] in ("certified", "uncertified"), row
        assert row["forward_identical"] is True and not is_false_certificate(row), row
        assert row["seconds"] > 0 and row["rel_error_f32"] is not None
    vit = new_rows["hf:ViTForImageClassification"]
    assert vit["status"] == "certified" and vit["rel_error"] < 1e-10
    assert vit["rel_error_original"] > 1e-3  # LayerNorm, GELU, softmax: incomplete as is
    assert vit["target"].startswith("class") and vit["family"] == "hf/image:vit"
    assert new_rows["torchvision:squeezenet1_1"]["family"] == "torchvision/squeezenet"


def _fake(key: str, tier: str = "numeric", **fields) -> dict:
    source, name = key.split(":", 1)
    row = {"key": key, "tier": tier, "source": source, "name": name, "traced_by": "export",
           "certified": True, "status": "certified", "params": 1000, "seconds": 1.5,
           "forward_identical": True, "rel_error": 1e-16, "rel_error_f32": 1e-7,
           "rel_error_original": 0.5, "counts": {"attention": 1}, "named": False}
    return row | fields


FAKE = [
    _fake("hf:LlamaForCausalLM", family="hf/causal:llama", named=True),
    _fake("hf:LlamaForCausalLM@sdpa", family="hf/causal:llama", named=True, rel_error=3e-2),
    _fake("hf:GPT2LMHeadModel", family="hf/causal:gpt2", named=True, status="internal error",
          certified=None, traced_by="unknown", stage="transform", error_type="RuntimeError",
          error="Node submod_3 target", error_where="transform.py:1 f", rel_error=None),
    _fake("hf:ViTForImageClassification", family="hf/image:vit", named=True),
    _fake("hf:BitForImageClassification", family="hf/image:bit", status="no small config",
          stage="build", error="ValueError: num_channels must be divisible", certified=None),
    _fake("torchvision:swin_t", "static", family="torchvision/swin_transformer", named=True,
          certified=False, status="uncertified", forward_identical=None, rel_error=None,
          violations=[{"op": "shifted_window_attention", "why": "opaque"}]),
    _fake("torchvision:resnet18", family="torchvision/resnet", traced_by="fx"),
]


def test_report_renders_the_new_sections(tmp_path: Path) -> None:
    text = render(FAKE, META)
    assert text.startswith("# Coverage of libra_transform over Hugging Face transformers and "
                           "torchvision")
    for heading in ("## Hugging Face transformers", "### `*ForCausalLM`",
                    "### Not built from a small config", "## torchvision",
                    "### torchvision/swin_transformer"):
        assert f"\n{heading}" in text, heading
    assert "| `LlamaForCausalLM@sdpa` | numeric |" in text and "| `swin_t` | static |" in text
    assert "| `BitForImageClassification` | bit | ValueError: num_channels" in text
    # the promises count the new sections' rows: one false certificate, one raw exception
    assert "relative error > 0.0001): **1**: `hf:LlamaForCausalLM@sdpa`" in text
    assert "(not a LibraError): **1**: `hf:GPT2LMHeadModel`" in text
    assert "Built and run: 4 of 5 rows; 1 classes could not be built" in text
    assert "torchvision models issue 14 names certified complete: 0.0% (0/1)" in text
    assert "coverage-notes.md" not in text
    (tmp_path / "coverage-notes.md").write_text("# notes\n")
    md = write_report(FAKE, META, tmp_path)
    assert "[coverage-notes.md](coverage-notes.md)" in md.read_text()


def test_only_reuses_the_other_sections(tmp_path: Path) -> None:
    import json

    from benchmarks.coverage import parse_args, reuse
    from benchmarks.coverage_plan import sections

    previous = [_fake("timm:resnet18"), _fake("timm:vgg11", status="skipped"), *FAKE[:2]]
    path = tmp_path / "coverage.json"
    path.write_text(json.dumps({"meta": {"command": "old", "date": "then"}, "rows": previous}))
    args = parse_args(["--only", "hf,torchvision", "--reuse", str(path)])
    cached = _fake("timm:resnet18", seconds=9.0)
    rows, source = reuse(args, tmp_path, {("timm:resnet18", "numeric"): cached},
                         sections(args))
    assert sorted(r["key"] for r in rows) == ["timm:resnet18", "timm:vgg11"]
    assert [r["seconds"] for r in rows if r["key"] == "timm:resnet18"] == [9.0]  # cache first
    assert source == {"path": str(path), "command": "old", "date": "then"}
    with pytest.raises(SystemExit):
        sections(parse_args(["--only", "hf,nope"]))


def test_keys_run_hf_in_the_numeric_tier_only() -> None:
    from benchmarks.coverage import parse_args
    from benchmarks.coverage_plan import plan

    jobs, skipped = plan(parse_args(["--keys", "hf:LlamaForCausalLM,torchvision:swin_t"]), None)
    assert sorted(jobs) == [("hf:LlamaForCausalLM", "numeric"), ("torchvision:swin_t", "numeric"),
                            ("torchvision:swin_t", "static")] and skipped == []
    jobs, _ = plan(parse_args(["--quick", "--only", "torchvision"]), None)
    assert jobs and all(k.startswith("torchvision:") for k, _ in jobs)
