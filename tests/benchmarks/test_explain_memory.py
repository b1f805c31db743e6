"""benchmarks.explain_memory --quick: the rows come back, from the chunking asked for."""

from __future__ import annotations

import json

import pytest

from benchmarks import explain_memory

pytestmark = pytest.mark.bench  # see [tool.pytest.ini_options] markers


def test_quick_rows_and_increment_follows_chunk(tmp_path):
    # the --quick plan, libra form only: two fresh processes, ~10 s each on one thread
    plan = {**explain_memory.QUICK, "libra": (True,)}
    rows = explain_memory.run_all(plan, progress=False)
    assert [(r["internal_batch_size"], r["libra"]) for r in rows] == [(2, True), (8, True)]
    for row in rows:
        assert row["model"] == "vit_tiny_patch16_224" and row["steps"] == 4
        assert row["finite"]
        assert row["wall_s"] > 0 and row["baseline_mib"] > 0
        assert row["peak_mib"] >= row["baseline_mib"]
    small, large = rows
    assert small["chunks"] == 4 and large["chunks"] == 1  # 4 steps x 2 images = 8 rows
    # the increments themselves are the benchmark's to report: ru_maxrss in a test process
    # tree is too noisy to compare here
    text = explain_memory.table(rows)
    assert text.splitlines()[0].split()[0] == "internal_batch_size"
    assert len(text.splitlines()) == 2 + len(rows)


def test_cli_plan_and_json(tmp_path, monkeypatch, capsys):
    seen = []

    def fake(plan, progress=True):
        seen.append(plan)
        return [
            {"internal_batch_size": 2, "libra": False, "steps": 4, "wall_s": 0.5,
             "baseline_mib": 800.0, "peak_mib": 850.0, "increment_mib": 50.0}
        ]  # fmt: skip

    monkeypatch.setattr(explain_memory, "run_all", fake)
    out = tmp_path / "rows.json"
    explain_memory.main(["--quick", "--json", str(out)])
    assert seen[0]["model"] == "vit_tiny_patch16_224" and seen[0]["sizes"] == (2, 8)
    assert json.loads(out.read_text())[0]["increment_mib"] == 50.0
    assert "peak-baseline MiB" in capsys.readouterr().out
    explain_memory.main(["--sizes", "8", "16", "--steps", "8", "--extra", "50", "16"])
    assert seen[1]["model"] == "vit_base_patch16_224" and seen[1]["sizes"] == (8, 16)
    assert seen[1]["steps"] == 8 and seen[1]["extra"] == [50, 16]
    configs = explain_memory.configs(seen[1])
    assert len(configs) == 5 and configs[-1]["steps"] == 50 and configs[-1]["libra"]
