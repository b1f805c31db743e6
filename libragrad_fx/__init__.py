"""libragrad-fx: faithful gradient explanations for vision Transformers, as an FX pass."""

from __future__ import annotations

from .attribution import METHODS, Explainer, Explanation, explain
from .attribution.targets import continuation_logprob, token_logit
from .compiler.bias import BiasSite
from .compiler.certify import Violation, certify
from .compiler.completeness import Completeness, completeness_error
from .compiler.graph_module import LibraGraphModule
from .compiler.report import Rewrite, RewriteReport
from .compiler.rules import ALL_RULES, Rule, libra
from .compiler.transform import libra_transform
from .errors import (
    InputError,
    LibraError,
    LibraWarning,
    TraceError,
    TrainingModeError,
    TransformBugError,
    UncertifiedError,
)
from .loading.text import embed_tokens

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
    "TransformBugError",
    "UncertifiedError",
    "Violation",
    "certify",
    "completeness_error",
    "continuation_logprob",
    "embed_tokens",
    "explain",
    "libra",
    "libra_transform",
    "token_logit",
]
