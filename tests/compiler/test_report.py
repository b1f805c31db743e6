"""The transform's report (libragrad_fx.compiler.report): its JSON, its counts and its table.

Moved from tests/test_errors.py, unchanged.
"""

from __future__ import annotations

import json
import re

import pytest
import torch.nn.functional as F
from torch import nn

from libragrad_fx import libra, libra_transform

D = 8


pytestmark = pytest.mark.usefixtures("seeded")  # torch.manual_seed(0) before each test



class ViTBlock(nn.Module):
    """LayerNorm, fused attention and a GELU MLP, with residuals: every rule but self-gating."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, D)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


def test_report_json_round_trips():
    report = libra_transform(ViTBlock().eval(), strict=True).libra_report
    data = report.to_dict()
    assert json.loads(report.to_json()) == data
    assert json.loads(report.to_json(indent=None)) == data
    assert "\n" not in report.to_json(indent=None)
    assert set(data) == {
        "model", "frontend", "rules", "counts", "complete", "rewrites", "violations", "bias_sites"}
    assert data["model"] == "ViTBlock"
    assert data["counts"] == {"attention": 1, "gate": 1, "elementwise": 0, "norm": 2,
                              "self_gating": 0}
    assert [r["rule"] for r in data["rewrites"]] == [r.rule for r in report.rewrites]
    assert {"node", "module", "rule", "op", "action"} <= set(data["rewrites"][0])


def test_report_counts_every_enabled_rule_with_zeros():
    mlp = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, 2)).eval()
    report = libra_transform(mlp, strict=True).libra_report
    assert report.counts == {"attention": 0, "gate": 1, "elementwise": 0, "norm": 0,
                             "self_gating": 0}

    report = libra_transform(mlp, rules=libra(norm=False), strict=True).libra_report
    assert report.counts == {"attention": 0, "gate": 1, "elementwise": 0, "self_gating": 0}

    linear = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 2)).eval()
    report = libra_transform(linear, strict=True).libra_report
    assert report.counts == {"attention": 0, "gate": 0, "elementwise": 0, "norm": 0,
                             "self_gating": 0}
    assert report.rewrites == [] and report.violations == []
    assert "(no rewrites)" in str(report)


def test_report_text_has_one_row_per_rewrite_and_totals():
    report = libra_transform(ViTBlock().eval(), strict=True).libra_report
    lines = str(report).splitlines()
    rows = [line.split() for line in lines if re.match(r"\d+\s", line)]
    assert len(rows) == len(report.rewrites) == 4
    for i, (row, rewrite) in enumerate(zip(rows, report.rewrites, strict=True), 1):
        assert row[:4] == [str(i), rewrite.node, rewrite.module or "<root>", rewrite.rule]
    (totals,) = [line for line in lines if line.startswith("totals")]
    for rule, n in report.counts.items():
        assert f"{rule} {n}" in totals
    assert totals.rstrip().endswith("4")
    assert "certified complete: every gradient path has degree 1" in lines
