"""The exceptions and warnings libragrad_fx raises: one family, so callers can catch them all."""

from __future__ import annotations


class LibraError(Exception):
    """Base class of every error libragrad_fx raises on purpose."""


class TraceError(LibraError):
    """The model could not be turned into an FX graph."""


class TrainingModeError(LibraError):
    """The model is in training mode; LibraGrad explains the eval-mode forward."""


class InputError(LibraError):
    """An input given to a transformed model does not fit it."""


class UncertifiedError(LibraError):
    """Strict mode: a nonlinear op on the gradient path was left without a rule."""


class TransformBugError(LibraError):
    """An unexpected failure inside a stage of ``libra_transform``: a libragrad_fx bug."""


class LibraWarning(UserWarning):
    """Something was left untouched that the user should know about."""
