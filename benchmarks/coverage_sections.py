"""The Hugging Face and torchvision sections of docs/coverage.md, from the sweep's rows.

Every number is computed from the rows. A Hugging Face class that could not be built from a small
config ("no small config") is listed with its reason and left out of the percentages: it says
nothing about libra_transform.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

COMPLETE_TOL = 1e-4
NOT_RUN = ("skipped", "no small config")
TASK_TITLES = {"image": "`*ForImageClassification`", "sequence": "`*ForSequenceClassification`",
               "causal": "`*ForCausalLM` (and the other causal-LM classes of the mapping)"}


def _task(row: dict) -> str:
    return (row.get("family") or "hf/?:?").split("/", 1)[1].split(":", 1)[0]


def _model_type(row: dict) -> str:
    return (row.get("family") or "?:?").rsplit(":", 1)[-1]


def hf_section(rows: list[dict], summary_row: Callable[[str, list[dict]], str],
               header: list[str], model_row: Callable[[dict], str],
               names: Callable[[list[dict]], str], escape: Callable[[str], str]) -> list[str]:
    """The ``## Hugging Face transformers`` section (empty when there is no hf row)."""
    hf = [r for r in rows if r["source"] == "hf"]
    if not hf:
        return []
    built = [r for r in hf if r["status"] not in NOT_RUN]
    unbuilt = sorted((r for r in hf if r["status"] == "no small config"), key=lambda r: r["key"])
    eager = [r for r in hf if "@" not in r["name"]]
    sdpa = [r for r in hf if r["name"].endswith("@sdpa")]
    out = [
        "## Hugging Face transformers",
        "",
        f"Every class of transformers' image-classification, sequence-classification and "
        f"causal-LM auto mappings ({len(eager)} classes), each built from a tiny random config: "
        "the config class's defaults with every common size attribute that exists shrunk "
        "(hidden 32, 2 layers, 4 heads, vocabulary 256, 32×32 images, ...; "
        "`benchmarks/coverage_hf.py`), eager attention, plus an `@sdpa` row for each class of "
        f"the families issue 14 names that supports it ({len(sdpa)} rows). Numeric tier only "
        "(the models are tiny): text models are called on `inputs_embeds` (batch 1, 8 tokens), "
        "vision models on `pixel_values`; the target is the argmax logit (at the last position "
        "for a causal LM).",
        "",
        f"Built and run: {len(built)} of {len(hf)} rows; {len(unbuilt)} classes could not be "
        "built from a small config (listed at the end of this section, with the reason; they "
        "are not counted below).",
        "",
        "| scope | rows | traced by fx | traced by export | trace failed | not traced (other) "
        "| certified complete | forward identical (numeric) | rel. error ≤ 1e-4 (numeric) |",
        "|---|---|---|---|---|---|---|---|---|",
        summary_row("every class built (eager and sdpa rows)", built),
    ]
    for task in TASK_TITLES:
        out.append(summary_row(f"{task}", [r for r in built if _task(r) == task]))
    out += [summary_row("the families issue 14 names", [r for r in built if r.get("named")]),
            summary_row("sdpa rows", [r for r in built if r["name"].endswith("@sdpa")]), ""]
    for task, title in TASK_TITLES.items():
        members = sorted((r for r in built if _task(r) == task), key=lambda r: r["name"])
        if members:
            out += [f"### {title}", ""] + header + [model_row(r) for r in members] + [""]
    if unbuilt:
        out += ["### Not built from a small config", "", "| class | family | why |",
                "|---|---|---|"]
        out += [f"| `{r['name']}` | {_model_type(r)} | {escape(str(r.get('error', '')))[:300]} |"
                for r in unbuilt]
        out.append("")
    return out


def torchvision_section(rows: list[dict], summary_row: Callable[[str, list[dict]], str],
                        header: list[str], model_row: Callable[[dict], str],
                        names: Callable[[list[dict]], str]) -> list[str]:
    """The ``## torchvision`` section (empty when there is no torchvision row)."""
    tv = [r for r in rows if r["source"] == "torchvision"]
    if not tv:
        return []
    best: dict[str, dict] = {}
    for r in tv:  # the numeric row where it ran, else the static one
        if r["key"] not in best or (r["tier"] == "numeric" and r["status"] != "skipped"):
            best[r["key"]] = r
    zoo = list(best.values())
    reps = [r for r in tv if r["tier"] == "numeric"]
    named = [r for r in zoo if r.get("named")]
    skipped = [r for r in tv if r["status"] == "skipped"]
    out = [
        "## torchvision",
        "",
        f"Every classification model of `torchvision.models.list_models(module="
        f"torchvision.models)` ({len(zoo)} models), random weights, by the default frontend "
        "with example inputs: **static tier** on the meta device for all of them, **numeric "
        "tier** (as above: perturbed weights, batch 1, 224×224, 299×299 for Inception v3) for "
        "the smallest of each family (torchvision module; sizes from the weights' metadata).",
        "",
        "| scope | models | traced by fx | traced by export | trace failed | not traced (other) "
        "| certified complete | forward identical (numeric) | rel. error ≤ 1e-4 (numeric) |",
        "|---|---|---|---|---|---|---|---|---|",
        summary_row("every model (distinct)", zoo),
        summary_row("smallest of each family", [best.get(r["key"], r) for r in reps]),
        summary_row("the models issue 14 names (vit_b_16, swin_t, maxvit_t, convnext_tiny, "
                    "efficientnet_b0)", named),
        "",
    ]
    if skipped:
        out += ["Numeric tier skipped for size: " + names(skipped)[2:] + ".", ""]
    families: dict[str, list[dict]] = defaultdict(list)
    for r in tv:
        if r["status"] != "skipped":
            families[r.get("family") or "?"].append(r)
    for fam in sorted(families):
        members = sorted(families[fam], key=lambda r: (r["tier"] != "numeric", r["name"]))
        out += [f"### {fam}", ""] + header + [model_row(r) for r in members] + [""]
    return out


def error_stats(rows: list[dict], names: Callable[[list[dict]], str]) -> list[str]:
    """Sentences on the measured errors: the worst certified model, the original models, and
    the models the certificate refuses although they measure complete (it is conservative)."""
    measured = [r for r in rows if r.get("rel_error") is not None]
    certified = [r for r in measured if r.get("certified")]
    lines = []
    if certified:
        worst = max(certified, key=lambda r: r["rel_error"])
        worst32 = max(certified, key=lambda r: r.get("rel_error_f32") or 0.0)
        lines.append(
            f"- Certified models measured ({len(certified)}): largest relative error "
            f"{worst['rel_error']:.1e} in float64 (`{worst['key']}`), "
            f"{worst32.get('rel_error_f32') or 0.0:.1e} in float32 (`{worst32['key']}`).")
    originals = sorted(r["rel_error_original"] for r in certified
                       if r.get("rel_error_original") is not None)
    if originals:
        incomplete = sum(e > COMPLETE_TOL for e in originals)
        lines.append(
            f"- The same models without the transform: median relative error "
            f"{originals[len(originals) // 2]:.2g} (float64); {incomplete} of {len(originals)} "
            f"above {COMPLETE_TOL:g} (the others, such as ReLU CNNs, are complete as they are).")
    refused = [r for r in measured if r.get("certified") is False
               and r["rel_error"] <= COMPLETE_TOL]
    lines.append(f"- Not certified, yet measured complete at this input (the certificate is "
                 f"conservative there): {len(refused)}" + names(refused))
    return lines


SOURCE_ORDER = ("timm", "open_clip", "hf", "torchvision")
SOURCE_TITLES = {"timm": "timm", "open_clip": "open_clip", "hf": "Hugging Face transformers",
                 "torchvision": "torchvision"}


def _and(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def _reused(meta: dict) -> str:
    """Where the rows of the sections not run come from (``--only``)."""
    if not meta.get("rows_reused"):
        return ""
    src = meta.get("reused_from") or {}
    where = f" and `{src['path']}` (`{src.get('command')}`, {src.get('date')})" if src else ""
    return (f" Sections run: {', '.join(meta.get('sections', []))}; {meta['rows_reused']} rows "
            f"of the other sections reused from the cache{where}.")


def skipped_notes(rows: list[dict], meta: dict) -> list[str]:
    """Sentences on the timm and open_clip models the numeric tier skipped, and why."""
    out: list[str] = []
    skipped = sorted((r for r in rows if r["status"] == "skipped"
                      and r["source"] in ("timm", "open_clip")), key=lambda r: r["key"])
    big = [r for r in skipped if "cap" in r.get("error", "")]
    if big:
        out += ["", f"Numeric tier skipped for size (> {meta['param_cap'] / 1e6:.0f}M image-tower "
                "parameters; the static row stands for them): "
                + ", ".join(f"`{r['key']}` ({r['params'] / 1e6:.0f}M)" for r in big) + "."]
    same = [r for r in skipped if "same image tower" in r["error"]]
    if same:
        out += ["", "Numeric tier not repeated for configs whose image tower is identical to one "
                "already measured (they differ in the text tower only): "
                + ", ".join(f"`{r['key']}` (= `{r['error'].rsplit(' ', 1)[-1]}`)" for r in same)
                + "."]
    return out
