"""The benchmark's method vocabulary: which methods read attention, which a gradient (so the
Libra switch changes them), which are complete by construction, and the per-image metrics."""

from __future__ import annotations

from libragrad_fx import METHODS
from libragrad_fx.compiler.rules import ALL_RULES

ATTENTION = ("attention", "rollout", "genatt", "gradsam", "attcat", "tokentm")
# methods whose map is read off a gradient (the Libra switch changes them)
GRADIENT = tuple(m for m in METHODS if m not in ("attention", "rollout"))
COMPLETE = ("fullgrad", "fullgrad+", "integrated_gradients")
METRICS = ("srg", "mif", "lif", "srg_accuracy", "completeness", "ap", "discrimination")
# the rules an ablation switches off one at a time, as the library names them
RULES = tuple(rule.name for rule in ALL_RULES)
