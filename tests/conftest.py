"""The test harness: fixtures here, plain helper functions in tests/harness.py.

The layout mirrors the package (tests/compiler/ for libragrad_fx/compiler/, ...), with
tests/benchmarks/ for the smoke tests of benchmarks/ (marker ``bench``, see pyproject.toml).
Shared models are in tests/zoo.py, hand-written Libra forms as hooks in tests/hooks.py, and the
golden graphs in tests/golden/ (``python -m tests.golden`` regenerates them).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def seeded() -> None:
    """torch.manual_seed(0) before the test; a module asks for it for every one of its tests with
    ``pytestmark = pytest.mark.usefixtures("seeded")``."""
    torch.manual_seed(0)
