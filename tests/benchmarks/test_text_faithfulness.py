"""The text benchmark on its shipped models: they keep their recorded accuracy on fresh
sequences, a quick run separates Libra's FullGrad+ completeness from vanilla's, and the
trainer's quick mode runs."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import text_faithfulness, train_text
from benchmarks.text_task import (
    KEYS,
    LENGTH,
    NAMES,
    PAD,
    WEIGHTS,
    accuracy,
    load_text_model,
    make_sequences,
)

pytest.importorskip("transformers")
pytestmark = [pytest.mark.bench, pytest.mark.filterwarnings("ignore::UserWarning")]


def test_sequences_hold_one_key_at_the_evidence_and_decide_the_class():
    ids, labels, evidence = make_sequences(64, 5)
    assert ids.shape == evidence.shape == (64, LENGTH)
    keys = torch.isin(ids, torch.tensor(KEYS))
    assert torch.equal(keys, evidence) and (evidence.sum(1) == 1).all()
    assert torch.equal(ids[evidence], torch.tensor(KEYS)[labels])
    assert not (ids == PAD).any()
    assert torch.equal(make_sequences(64, 5)[0], ids)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_keeps_its_recorded_accuracy_on_fresh_sequences(name):
    recorded = json.loads((WEIGHTS / "text_metrics.json").read_text())[f"text_{name}"]
    ids, labels, _ = make_sequences(500, 12345)
    assert accuracy(load_text_model(name), ids, labels) >= recorded - 0.02


@pytest.fixture(scope="module")
def quick():
    return text_faithfulness.run_text(4, quick=True)


@pytest.mark.parametrize("name", NAMES)
def test_quick_run_libra_fullgrad_plus_is_complete_and_vanilla_is_not(quick, name):
    row = quick[name]["fullgrad+"]
    assert row["libra"]["completeness"] < 1e-4
    assert row["vanilla"]["completeness"] > 1e-3
    assert set(row["libra"]) == set(text_faithfulness.METRICS)
    assert text_faithfulness.PEER in quick[name]["peers"]


def test_quick_run_has_the_claims_and_tables(quick):
    claims = text_faithfulness.text_claims(quick)
    assert [c[0] for c in claims] == list(NAMES)
    assert all(c[1] == "Libra IxG evidence-token AP > vanilla IxG" for c in claims)
    lines = text_faithfulness.markdown_text(quick)
    assert lines[0] == "## Text benchmark"
    assert sum(line.startswith("| fullgrad+ |") for line in lines) == len(NAMES)


def test_train_text_quick_runs_and_writes_nothing():
    before = {p.name: p.stat().st_mtime for p in WEIGHTS.iterdir()}
    results = train_text.main(["--quick"])
    assert set(results) == set(NAMES) and all(0 <= a <= 1 for a in results.values())
    assert {p.name: p.stat().st_mtime for p in WEIGHTS.iterdir()} == before
