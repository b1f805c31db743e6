"""Attribution methods on the compiled graph: explain(), Explainer and Explanation."""

from .explainer import METHODS, PIXEL_METHODS, Explainer, explain
from .explanation import Explanation

__all__ = ["METHODS", "PIXEL_METHODS", "Explainer", "Explanation", "explain"]
