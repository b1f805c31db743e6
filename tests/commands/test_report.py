"""``libragrad-fx report`` (libragrad_fx.commands.report): the JSON and the table, and bad
input as one-line errors. The toy models are named by import path, from tests/test_errors.py.

Moved from tests/test_errors.py, unchanged.
"""

from __future__ import annotations

import json

import pytest

from libragrad_fx.commands.cli import main

pytestmark = pytest.mark.usefixtures("seeded")  # torch.manual_seed(0) before each test



def test_cli_report_json(capsys):
    assert main(["report", "vit_tiny_patch16_224", "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["model"] == "VisionTransformer"
    assert data["counts"] == {"attention": 12, "gate": 12, "elementwise": 0, "norm": 25,
                              "self_gating": 0}
    assert data["violations"] == [] and data["complete"] is True


def test_cli_report_table_lists_violations(capsys):
    assert main(["report", "tests.test_errors:AtanNet"]) == 0
    out = capsys.readouterr().out
    assert "totals:" in out
    assert "NOT certified complete: 1 violation(s)" in out and "atan" in out


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("vit_no_such_model_xyz", "vit_no_such_model_xyz"),
        ("open_clip:NoSuchNet", "NoSuchNet"),
        ("no_such_package_xyz:Model", "no_such_package_xyz"),
        ("tests.test_errors:D", "not a torch.nn.Module"),
    ],
)
def test_cli_unknown_model_is_a_one_line_error(capsys, spec, named):
    assert main(["report", spec]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("libragrad-fx: error:")
    assert named in err
    assert "Traceback" not in err


def test_cli_strict_refusal_is_a_one_line_error(capsys):
    assert main(["report", "tests.test_errors:AtanNet", "--strict"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1
    assert "atan" in err and "Traceback" not in err
