"""benchmarks.faithfulness --quick on the shipped models: the report and its claims, and the same
numbers from two torchrun processes (gloo) as from one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import faithfulness

pytestmark = pytest.mark.bench  # see [tool.pytest.ini_options] markers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("faithfulness")
    faithfulness.main(["--quick", "--out", str(out / "results.md"),
                       "--json", str(out / "results.json")])
    return out


def test_quick_report(single):
    text = (single / "results.md").read_text()
    assert "## Claims" in text and "## vit" in text and "## mixer" in text
    results = json.loads((single / "results.json").read_text())["results"]
    for name in ("vit", "mixer"):
        table = results[name]
        assert table["fullgrad+"]["libra"]["completeness"] < 1e-4
        assert table["fullgrad"]["vanilla"]["completeness"] > 1e-4
        assert 0 <= table["fullgrad+"]["libra"]["ap"] <= 1
    assert results["mixer"]["rollout"]["libra"] is None  # no attention in a Mixer
    vit_peers = results["vit"]["peers"]
    assert math.isfinite(vit_peers["LXT CP-LRP"]["srg"]) and vit_peers["Captum IG"]["seconds"] > 0
    assert "open_clip" in vit_peers["LeGrad"]["reason"]
    assert "LXT CP-LRP (peer" in text
    assert results["vit"]["rollout"]["libra"] == results["vit"]["rollout"]["vanilla"]


def test_two_processes_give_the_numbers_of_one(single, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29533", "-m", "benchmarks.faithfulness", "--quick",
               "--json", str(tmp_path / "two.json"), "--out", str(tmp_path / "two.md"),
               "--peers"]  # no peers: their maps round differently in a smaller batch
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    one = json.loads((single / "results.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["meta"]["processes"] == 2 and one["meta"]["processes"] == 1
    for name, table in one["results"].items():
        for method, forms in table.items():
            if method == "peers":
                continue
            for form, cell in forms.items():
                other = two["results"][name][method][form]
                if cell is None:
                    assert other is None
                    continue
                for metric, value in cell.items():
                    assert math.isclose(value, other[metric], rel_tol=1e-4, abs_tol=1e-6), (
                        name, method, form, metric, value, other[metric])


def test_attention_methods_on_a_model_without_class_token_read_the_mean_query():
    """The EVA pools by the mean, so rollout averages the query rows instead of being dropped;
    the Mixer has no attention at all and gets no row."""
    single = faithfulness.data.make_digits("test", 4, seed=1)
    two = faithfulness.data.make_digits("test", 4, two=True, seed=2)
    rows = faithfulness.measure(faithfulness._model("eva"), "rollout", True, single, two, True)
    assert rows is not None and len(rows) == 4
    assert all(math.isfinite(r["srg"]) and 0 <= r["ap"] <= 1 for r in rows)
    mixer = faithfulness._model("mixer")
    assert faithfulness.measure(mixer, "rollout", True, single, two, True) is None
