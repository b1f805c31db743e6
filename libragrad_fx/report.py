"""RewriteReport: every rewrite the pass made and every nonlinear op it left, for auditing."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .audit import Untouched


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
    """The audit trail of one ``libra_transform`` call; ``print`` it or export it as JSON."""

    model: str
    rules: tuple[str, ...]
    rewrites: list[Rewrite] = field(default_factory=list)
    untouched: list[Untouched] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Rewrites per enabled rule (zeros included)."""
        counts = dict.fromkeys(self.rules, 0)
        for r in self.rewrites:
            counts[r.rule] += 1
        return counts

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "rules": list(self.rules),
            "counts": self.counts,
            "rewrites": [asdict(r) for r in self.rewrites],
            "untouched": [asdict(u) for u in self.untouched],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        lines = [f"LibraGrad rewrite report: {self.model}", f"rules: {', '.join(self.rules)}", ""]
        rows = [("#", "node", "module", "rule", "action")] + [
            (str(i), r.node, r.module or "<root>", r.rule, r.action)
            for i, r in enumerate(self.rewrites, 1)
        ]
        lines += _table(rows) if self.rewrites else ["(no rewrites)"]
        totals = " | ".join(f"{rule} {n}" for rule, n in self.counts.items())
        lines += ["", f"totals: {totals} | all {len(self.rewrites)}", ""]
        if self.untouched:
            lines.append(f"untouched nonlinear ops on the gradient path ({len(self.untouched)}):")
            lines += _table([("node", "module", "op", "why")] + [
                (u.node, u.module or "<root>", u.op, u.why) for u in self.untouched])
        else:
            lines.append("untouched nonlinear ops on the gradient path: none")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"RewriteReport(model={self.model!r}, counts={self.counts}, " \
               f"untouched={len(self.untouched)})"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]
