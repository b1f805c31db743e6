"""Attribution methods on the compiled graph: explain(), Explainer and Explanation."""

from .explainer import Explainer, explain
from .explanation import Explanation
from .registry import METHODS, PIXEL_METHODS

__all__ = ["METHODS", "PIXEL_METHODS", "Explainer", "Explanation", "explain"]
