"""The LibraGrad rules, one file each, and the ``libra`` preset that switches them."""

from __future__ import annotations

from . import attention, elementwise, gate, norm, self_gating
from .base import Rule

# Order matters: the gate rule runs before the elementwise rule (a gate's own sigmoid or tanh
# is then constant, so the gate wins), and self-gating runs last, on the products still
# carrying gradient after the other rules have made gates and statistics constant.
ALL_RULES: tuple[Rule, ...] = (attention.RULE, gate.RULE, elementwise.RULE, norm.RULE,
                               self_gating.RULE)


def libra(
    *, attention: bool = True, gate: bool = True, self_gating: bool = True, norm: bool = True,
    elementwise: bool = True,
) -> tuple[Rule, ...]:
    """The LibraGrad preset; switch a rule off for the paper's ablations (``elementwise`` is
    this library's extension beyond the paper: tanh, a lone sigmoid, softplus, ...)."""
    wanted = {"attention": attention, "gate": gate, "self_gating": self_gating, "norm": norm,
              "elementwise": elementwise}
    return tuple(rule for rule in ALL_RULES if wanted[rule.name])


__all__ = ["ALL_RULES", "Rule", "libra"]
