"""The results page of the digits benchmark: the claims, the paper's tables, a table per model
with its peers, and the text benchmark's section."""

from __future__ import annotations

import math

from benchmarks import tables
from benchmarks.method_sets import ATTENTION, GRADIENT, METRICS


def claims(result: dict) -> list[tuple[str, str, bool | None, str]]:
    """(model, claim, holds, evidence) for the claims the issues make; holds is None where a
    peer could not run the model."""
    out = []
    for name, table in result.items():
        def srg(method: str, form: str, table: dict = table) -> float:
            cell = table.get(method, {}).get(form)
            return float("nan") if cell is None else cell["srg"]

        worse = [m for m in GRADIENT if table.get(m, {}).get("libra") is not None
                 and not srg(m, "libra") > srg(m, "vanilla")]
        out.append((name, "Libra improves SRG for every gradient method", not worse,
                    "all improve" if not worse else "not for " + ", ".join(worse)))
        libra_gap = table["fullgrad+"]["libra"]["completeness"]
        vanilla_gap = table["fullgrad"]["vanilla"]["completeness"]
        out.append((name, "Libra FullGrad+ completeness < 1e-4, vanilla FullGrad's is not",
                    libra_gap < 1e-4 <= vanilla_gap,
                    f"Libra FullGrad+ {libra_gap:.1e}, vanilla FullGrad {vanilla_gap:.2g}"))
        ours = table["fullgrad+"]["libra"]
        for peer in ("LXT CP-LRP", "LXT AttnLRP"):
            cell = table.get("peers", {}).get(peer)
            if cell is None:
                continue
            claim = f"Libra FullGrad+ SRG >= {peer}'s"
            if "reason" in cell:
                out.append((name, claim, None, f"not measurable: {cell['reason']}"))
                continue
            out.append((name, claim, ours["srg"] >= cell["srg"],
                        f"FullGrad+ {ours['srg']:.3f} ± {ours.get('srg_se', math.nan):.3f}; "
                        f"{peer} {cell['srg']:.3f}"))
        for form in ("vanilla", "libra"):  # as published, then with LibraGrad's backward too
            claim = f"Libra FullGrad+ SRG >= every attention method's ({form} form)"
            best = max(((table[m][form]["srg"], m) for m in ATTENTION
                        if table.get(m, {}).get(form) is not None), default=None)
            if best is None:
                out.append((name, claim, True, "no attention methods (no attention in the model)"))
                continue
            rival = table[best[1]][form]
            out.append((name, claim, ours["srg"] >= best[0],
                        f"FullGrad+ {ours['srg']:.3f} ± {ours.get('srg_se', math.nan):.3f}; "
                        f"best: {best[1]} {best[0]:.3f} ± {rival.get('srg_se', math.nan):.3f} "
                        "(± one standard error)"))
    return out


def _cell(value: float | None, metric: str) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.1e}" if metric == "completeness" else f"{value:.3f}"


def markdown(result: dict, meta: dict, text: dict | None = None) -> str:
    """The results page; ``text``: the text benchmark's result, its section and claims."""
    lines = [
        "# Faithfulness results",
        "",
        f"`{meta['command']}` on {meta['images']} single-digit and {meta['images']} two-digit "
        f"test canvases ({meta['seconds']:.0f} s, {meta['processes']} process(es)). Models: the "
        "shipped digits models (`libragrad_fx.digits`, trained by `benchmarks/train_digits.py`); "
        "CLIP is explained as a zero-shot classifier over the ten captions. Every cell is a mean "
        "over images, as vanilla / LibraGrad.",
        "",
        "- **SRG** = LIF − MIF of the target's softmax probability under token removal "
        "(fractions 0 … 0.9, trapezoid rule; higher is better); **MIF** lower is better, "
        "**LIF** higher; **SRG acc** the same on accuracy.",
        "- **completeness**: |Σ map + remainder − f(x)| / |f(x)| (for IG against "
        "f(x) − f(baseline)); it is meaningful for FullGrad, FullGrad+ and IG.",
        "- **AP**: average precision of the upsampled map against the digit's mask. "
        "**discrimination**: on two-digit canvases, the share of positive attribution on the "
        "queried digit (0.5 = no preference).",
        "- Attention methods read the class token's row of the attention; a model that pools "
        "without a class token (the EVA) averages the rows of all query tokens instead "
        "(`query=\"mean\"`). The Mixer has no attention, hence –.",
        "",
        "## Claims",
        "",
        "Each claim is checked on the means below, as measured. Where one does not hold, "
        "[results-notes.md](results-notes.md) says why we think so.",
        "",
        "| model | claim | holds | measured |",
        "|---|---|---|---|",
    ]
    rows = claims(result)
    if text is not None:
        from benchmarks.text_faithfulness import text_claims

        rows += [(f"text {n}", c, ok, ev) for n, c, ok, ev in text_claims(text)]
    lines += [f"| {n} | {c} | {'n/a' if ok is None else 'yes' if ok else '**no**'} | {ev} |"
              for n, c, ok, ev in rows]
    lines += ["", "## The paper's tables", "",
              "As LibraGrad's Tables 6, 4 and 5, on these models; cells read vanilla → Libra.",
              "", "### Table 6 style: SRG (probability), method × model", "",
              *tables.method_table(result, "srg"),
              "", "### Table 4 style: completeness error", "",
              *tables.method_table(result, "completeness", list(tables.COMPLETE))]
    ablation = tables.ablation_table(result, ("srg", "ap", "completeness"))
    if ablation:
        lines += ["", "### Table 5 style: ablation, FullGrad+ with one rule off at a time", "",
                  "A rule the model has no site for changes nothing (the Mixer and ViT have no "
                  "self-gating).", "", *ablation]
    for name, table in result.items():
        lines += ["", f"## {name}", "",
                  "| method | " + " | ".join(METRICS).replace("_", " ") + " |",
                  "|---|" + "---|" * len(METRICS)]
        for method, forms in table.items():
            if method == "peers":
                continue
            forms = {f: c for f, c in forms.items() if f in ("vanilla", "libra")}
            cells = []
            for metric in METRICS:
                pair = [None if forms.get(f) is None else forms[f][metric]
                        for f in ("vanilla", "libra")]
                cells.append(f"{_cell(pair[0], metric)} / {_cell(pair[1], metric)}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        for peer, cell in table.get("peers", {}).items():
            shown = ([f"n/a: {cell['reason']}"] + [""] * (len(METRICS) - 1) if "reason" in cell
                     else [_cell(cell[m], m) for m in METRICS])
            lines.append(f"| {peer} (peer, {_seconds(cell)}) | " + " | ".join(shown) + " |")
    if text is not None:
        from benchmarks.text_faithfulness import markdown_text

        lines += ["", *markdown_text(text)]
    return "\n".join(lines) + "\n"


def _seconds(cell: dict) -> str:
    return "could not run" if "reason" in cell else f"{cell['seconds'] * 1000:.0f} ms/image"
