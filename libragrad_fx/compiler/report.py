"""RewriteReport: every rewrite the pass made, the certificate, and the bias sites."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .bias import BiasSite
from .certify import Violation


@dataclass(frozen=True)
class Rewrite:
    """One rewrite: which node, where in the model, by which rule, and what changed."""

    node: str
    module: str
    rule: str
    op: str
    action: str


@dataclass
class RewriteReport:
    """The audit trail of one ``libra_transform`` call; ``print`` it or export it as JSON.

    ``complete`` is the static certificate: True when no op breaks FullGrad-completeness
    (DESIGN.md §2); otherwise ``violations`` names each op that does.
    """

    model: str
    rules: tuple[str, ...]
    rewrites: list[Rewrite] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    bias_sites: list[BiasSite] = field(default_factory=list)
    frontend: str = "fx"

    @property
    def complete(self) -> bool:
        """The certificate: every gradient path is complete, so the output has degree 1."""
        return not self.violations

    @property
    def counts(self) -> dict[str, int]:
        """Rewrites per enabled rule (zeros included)."""
        counts = dict.fromkeys(self.rules, 0)
        for r in self.rewrites:
            counts[r.rule] += 1
        return counts

    def to_dict(self) -> dict:
        """Plain JSON types only (lists, not tuples), so ``json.loads(to_json()) == to_dict()``."""
        return json.loads(json.dumps(self._fields()))

    def _fields(self) -> dict:
        return {
            "model": self.model,
            "frontend": self.frontend,
            "rules": list(self.rules),
            "counts": self.counts,
            "complete": self.complete,
            "rewrites": [asdict(r) for r in self.rewrites],
            "violations": [asdict(v) for v in self.violations],
            "bias_sites": [asdict(b) for b in self.bias_sites],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self._fields(), indent=indent)

    def __str__(self) -> str:
        lines = [f"LibraGrad rewrite report: {self.model} (traced with {self.frontend})",
                 f"rules: {', '.join(self.rules)}", ""]
        rows = [("#", "node", "module", "rule", "action")] + [
            (str(i), r.node, r.module or "<root>", r.rule, r.action)
            for i, r in enumerate(self.rewrites, 1)
        ]
        lines += _table(rows) if self.rewrites else ["(no rewrites)"]
        totals = " | ".join(f"{rule} {n}" for rule, n in self.counts.items())
        lines += ["", f"totals: {totals} | all {len(self.rewrites)}"]
        implicit = sum(b.implicit for b in self.bias_sites)
        lines.append(f"bias sites: {len(self.bias_sites)} ({implicit} implicit)")
        lines.append("")
        if self.violations:
            lines.append(f"NOT certified complete: {len(self.violations)} violation(s)")
            lines += _table([("node", "module", "op", "why")] + [
                (v.node, v.module or "<root>", v.op, v.why) for v in self.violations])
        else:
            lines.append("certified complete: every gradient path has degree 1")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"RewriteReport(model={self.model!r}, counts={self.counts}, "
                f"complete={self.complete}, violations={len(self.violations)})")


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]
