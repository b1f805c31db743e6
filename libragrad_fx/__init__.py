"""libragrad-fx: faithful gradient explanations for vision Transformers, as an FX pass."""

from __future__ import annotations

from .attribution import METHODS, Explainer, Explanation, explain
from .bias import BiasSite
from .certify import Violation, certify
from .completeness import Completeness, completeness_error
from .errors import (
    InputError,
    LibraError,
    LibraWarning,
    TraceError,
    TrainingModeError,
    UncertifiedError,
)
from .graph_module import LibraGraphModule
from .report import Rewrite, RewriteReport
from .rules import ALL_RULES, Rule, libra
from .transform import libra_transform

__all__ = [
    "ALL_RULES",
    "METHODS",
    "BiasSite",
    "Completeness",
    "Explainer",
    "Explanation",
    "InputError",
    "LibraError",
    "LibraGraphModule",
    "LibraWarning",
    "Rewrite",
    "RewriteReport",
    "Rule",
    "TraceError",
    "TrainingModeError",
    "UncertifiedError",
    "Violation",
    "certify",
    "completeness_error",
    "explain",
    "libra",
    "libra_transform",
]
