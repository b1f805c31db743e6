"""The rewritten graphs of the reference models match tests/golden/ (regenerate: make golden)."""

import difflib

import pytest

from tests.golden import MODELS, golden_text, path


@pytest.mark.parametrize("name", list(MODELS))
def test_rewritten_graph_matches_golden(name: str) -> None:
    expected = path(name).read_text()
    actual = golden_text(name)
    if actual != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(True), actual.splitlines(True), "golden", "now", n=1))
        pytest.fail(f"rewritten graph of {name} changed (run `make golden` if intended):\n"
                    + diff[:6000])
