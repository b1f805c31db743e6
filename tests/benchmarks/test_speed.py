"""benchmarks.speed --quick: every contender timed, the claims computed, LXT's patches confined."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from benchmarks import speed

pytestmark = pytest.mark.bench  # see [tool.pytest.ini_options] markers


def test_quick_run_times_every_contender(tmp_path):
    speed.main(["--quick", "--out", str(tmp_path / "speed.md"), "--json", str(tmp_path / "s.json")])
    result = json.loads((tmp_path / "s.json").read_text())
    names = {g: [r["name"] for r in rows] for g, rows in result["groups"].items()}
    assert "Captum InputXGradient" in names["single"]
    assert "Captum IntegratedGradients" in names["integrated_gradients"]
    assert "LXT CP-LRP (input × gradient)" in names["lxt"]
    for rows in result["groups"].values():
        for row in rows:
            assert row["seconds"] > 0 and row["runs"] >= 1
    assert [c["bound"] for c in result["claims"]] == [1.0, 1.15, 1.0]
    for claim in result["claims"]:
        assert claim["holds"] == (claim["ratio"] <= claim["bound"])
    text = (tmp_path / "speed.md").read_text()
    assert "## Claims" in text and "LXT" in text and "Compile time" in text


def test_lxt_patches_are_on_only_inside_the_switch():
    """Inside, LayerNorm's backward skips the std (LXT's identity rule), so the gradient
    changes; outside, torch.nn is as it was."""
    layer_norm = nn.LayerNorm(8).eval()
    x = torch.randn(3, 8)

    def grad() -> torch.Tensor:
        leaf = x.clone().requires_grad_(True)
        (layer_norm(leaf) * torch.arange(8.0)).sum().backward()
        return leaf.grad

    before, forward = grad(), nn.LayerNorm.forward
    switch = speed._lxt_switch()
    assert nn.LayerNorm.forward is forward
    with switch():
        assert nn.LayerNorm.forward is not forward
        inside = grad()
    assert nn.LayerNorm.forward is forward
    assert not torch.allclose(inside, before)
    torch.testing.assert_close(grad(), before, rtol=0, atol=0)


def test_peak_memory_sees_an_allocation():
    seconds, peak = speed.timed(lambda: torch.ones(64 * 2**20 // 4).add_(1))
    assert seconds > 0
    if peak is not None:  # Linux
        assert peak >= 50
