"""Metrics of DESIGN §5: faithfulness by token removal, completeness, localisation."""

from .gap import completeness_gap
from .localisation import average_precision, class_discrimination
from .removal import FRACTIONS, RemovalCurves, token_removal

__all__ = [
    "FRACTIONS",
    "RemovalCurves",
    "average_precision",
    "class_discrimination",
    "completeness_gap",
    "token_removal",
]
