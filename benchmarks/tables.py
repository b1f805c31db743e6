"""The paper's tables as markdown, from ``{model: {method: {form: {metric: mean}}}}``.

Table 6 of LibraGrad is a faithfulness table, method × model; Table 4 the completeness error,
method × model; Table 5 the ablation, one rule off at a time. The same three are drawn here for
any result of ``benchmarks.faithfulness`` (the digits models or a user's folder). A cell of a
method with both forms reads ``vanilla → Libra``. Peers (``result[model]["peers"][name]``, a
metric dict or ``{"reason": ...}``) are rows of their own, with the reason where they could not
run.
"""

from __future__ import annotations

import math

from benchmarks.method_sets import RULES

DEFAULT_METHODS = ("input_x_gradient", "integrated_gradients", "fullgrad", "fullgrad+", "gradcam",
                   "attcat", "genatt", "rollout")
COMPLETE = ("input_x_gradient", "fullgrad", "fullgrad+", "integrated_gradients")
LABELS = {"mif": "MIF (probability, lower is better)", "lif": "LIF (probability)",
          "srg": "SRG (probability, LIF − MIF)", "mif_accuracy": "MIF (accuracy, lower is better)",
          "lif_accuracy": "LIF (accuracy)", "srg_accuracy": "SRG (accuracy)",
          "completeness": "completeness error", "ap": "AP against the masks"}


def number(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.1e}" if metric == "completeness" else f"{value:.3f}"


def _methods(results: dict) -> list[str]:
    seen: list[str] = []
    for table in results.values():
        seen += [m for m in table if m != "peers" and m not in seen]
    return seen


def _cell(forms: dict | None, metric: str) -> str:
    if not forms:
        return "–"
    values = [forms.get(f) for f in ("vanilla", "libra") if f in forms]
    shown = [number(None if v is None else v.get(metric), metric) for v in values]
    return " → ".join(shown)


def _peer_cell(peer: dict | None, metric: str) -> str:
    if peer is None:
        return "–"
    if "reason" in peer:
        return f"n/a ({peer['reason']})"
    return number(peer.get(metric), metric)


def method_table(results: dict, metric: str, methods: list[str] | None = None) -> list[str]:
    """Method × model for one metric (Table 6 with ``mif_accuracy``, Table 4 with
    ``completeness``); peer rows follow ours."""
    models = list(results)
    lines = ["| method | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for method in methods or _methods(results):
        if not any(method in results[m] for m in models):
            continue
        lines.append(f"| {method} | " + " | ".join(
            _cell(results[m].get(method), metric) for m in models) + " |")
    peers = sorted({p for m in models for p in results[m].get("peers", {})})
    for peer in peers:
        lines.append(f"| {peer} (peer) | " + " | ".join(
            _peer_cell(results[m].get("peers", {}).get(peer), metric) for m in models) + " |")
    return lines


def ablation_table(results: dict, metrics: tuple[str, ...] = ("srg", "ap", "completeness")
                   ) -> list[str]:
    """Table 5: FullGrad+ with every rule, then with each rule off in turn, then vanilla."""
    models = [m for m in results if any(f.startswith("no-") for f in
                                        results[m].get("fullgrad+", {}))]
    if not models:
        return []
    heads = [f"{model} {metric}" for model in models for metric in metrics]
    lines = ["| FullGrad+ | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for form, label in ([("libra", "all rules")] + [(f"no-{r}", f"without {r}") for r in RULES]
                        + [("vanilla", "no rules (vanilla)")]):
        cells = []
        for model in models:
            cell = results[model]["fullgrad+"].get(form)
            cells += [number(None if cell is None else cell.get(metric), metric)
                      for metric in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def report(results: dict, meta: dict) -> str:
    """The results page of a real-data run: the protocol, then Tables 6, 4 and 5."""
    has_ap = any("ap" in (cell or {}) for table in results.values()
                 for forms in table.values() if isinstance(forms, dict)
                 for cell in forms.values() if isinstance(cell, dict))
    lines = [f"# Faithfulness on {meta['data']}", "",
             f"Protocol `{meta['protocol']}`: {meta['summary']}. {meta['images']} images "
             f"(split {meta['split']}), {meta['processes']} process(es), "
             f"{meta['seconds']:.0f} s. Cells read vanilla → LibraGrad; methods with no "
             "gradient (rollout) have one form.", ""]
    for metric, title in (("mif_accuracy", "Table 6 style: MIF on accuracy"),
                          ("srg", "SRG on the protocol's score"),
                          ("mif", "MIF on the protocol's score")):
        lines += [f"## {title} ({LABELS[metric]})", "", *method_table(results, metric), ""]
    lines += ["## Table 4 style: completeness error", "",
              *method_table(results, "completeness", list(COMPLETE)), ""]
    if has_ap:
        lines += ["## Localisation: AP against the masks", "", *method_table(results, "ap"), ""]
    ablation = ablation_table(results, ("srg", "ap", "completeness") if has_ap
                              else ("srg", "completeness"))
    if ablation:
        lines += ["## Table 5 style: ablation, one rule off at a time", "", *ablation, ""]
    seconds = method_table(results, "seconds")
    lines += ["## Seconds per image (explanation only)", "", *seconds, ""]
    return "\n".join(lines)
