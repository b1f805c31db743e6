"""Regenerate tests/golden/*.txt: ``python -m tests.golden`` (or ``make golden``)."""

from . import MODELS, golden_text, path

for name in MODELS:
    path(name).write_text(golden_text(name))
    print(f"wrote {path(name)}")
