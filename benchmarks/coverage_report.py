"""docs/coverage.md and docs/coverage.json from the rows of the coverage sweep.

Every sentence with a number in it is computed here from the rows; nothing is written by hand.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from benchmarks.coverage_sections import (
    NOT_RUN,
    SOURCE_ORDER,
    SOURCE_TITLES,
    _and,
    _reused,
    error_stats,
    hf_section,
    skipped_notes,
    torchvision_section,
)

COMPLETE_TOL = 1e-4
RULES = ("attention", "gate", "norm", "self_gating")


def is_false_certificate(row: dict) -> bool:
    """Certified complete, yet the measured float64 relative error exceeds the tolerance."""
    err = row.get("rel_error")
    return bool(row.get("certified")) and err is not None and err > COMPLETE_TOL


def merged(rows: Iterable[dict]) -> dict[str, dict]:
    """One row per model: the numeric row where there is one that ran, else the static one."""
    best: dict[str, dict] = {}
    for row in rows:
        old = best.get(row["key"])
        if old is None or (old["status"] == "skipped") or (
                row["tier"] == "numeric" and row["status"] != "skipped"):
            best[row["key"]] = row
    return best


def blocker(row: dict) -> str | None:
    """Why a model is not certified complete, in words shared by every model it blocks."""
    status = row["status"]
    if status == "certified":
        return None
    if status == "uncertified":
        ops = Counter(f"`{v['op']}`: {v['why']}" for v in row.get("violations", []))
        return "not certified: " + "; ".join(op for op, _ in ops.most_common(2))
    if status in NOT_RUN:
        return f"not run: {row.get('error')}"
    message = str(row.get("error", ""))
    if status in ("timeout", "crashed"):
        return message.split("(", 1)[0].strip()
    message = message.split(". Data-dependent", 1)[0].split("\n", 1)[0]
    message = re.sub(r"symbolic tracing failed in module \S+ ", "symbolic tracing failed in ",
                     message)
    message = re.sub(r"^cannot trace \w+: ", "", message)
    message = re.sub(r"\d+", "N", message)[:160]
    where = f" ({row['error_where']})" if status == "internal error" else ""
    return f"{status} in {row.get('stage')}: {row.get('error_type')}: {message}{where}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:.1f}% ({n}/{d})" if d else "— (0/0)"


def _count(rows: list[dict], pred: Callable[[dict], bool]) -> int:
    return sum(1 for r in rows if pred(r))


def _forward_ran(row: dict) -> bool:
    """The original model ran, so the transformed one had to match it (or failed to run)."""
    return row.get("forward_identical") is not None or row.get("stage") == "forward_transformed"


def _summary_row(label: str, rows: list[dict]) -> str:
    ran = [r for r in rows if r["status"] not in NOT_RUN]
    num = [r for r in ran if r["tier"] == "numeric" and _forward_ran(r)]
    cells = [label, str(len(rows))]
    cells += [_pct(_count(ran, lambda r, t=t: r.get("traced_by") == t), len(ran))
              for t in ("fx", "export", "failed")]
    cells.append(_pct(_count(ran, lambda r: r.get("traced_by") not in ("fx", "export", "failed")),
                      len(ran)))
    cells.append(_pct(_count(ran, lambda r: r.get("certified") is True), len(ran)))
    cells.append(_pct(_count(num, lambda r: r.get("forward_identical") is True), len(num)))
    measured = [r for r in num if r.get("rel_error") is not None]
    cells.append(_pct(_count(measured, lambda r: r["rel_error"] <= COMPLETE_TOL), len(measured)))
    return "| " + " | ".join(cells) + " |"


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.1e}" if value and (abs(value) < 1e-2 or abs(value) >= 1e3) \
            else f"{value:.{digits}f}"
    return str(value)


def _model_row(r: dict) -> str:
    counts = r.get("counts") or {}
    why = blocker(r) or ""
    cells = [f"`{r['name']}`", r["tier"], _fmt(r["params"] / 1e6 if r.get("params") else None),
             _fmt(r.get("traced_by")), *[_fmt(counts.get(k)) for k in RULES],
             _fmt(r.get("certified")), _fmt(r.get("forward_identical")),
             _fmt(r.get("rel_error")), _fmt(r.get("rel_error_f32")),
             _fmt(r.get("rel_error_original")), _fmt(r.get("seconds")), _escape(why)]
    return "| " + " | ".join(cells) + " |"


MODEL_HEADER = [
    "| model | tier | params (M) | traced by | attention | gate | norm | self-gating | certified "
    "| forward identical | rel. error Libra f64 | rel. error Libra f32 | rel. error original f64 "
    "| seconds | blocker |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def render(rows: list[dict], meta: dict) -> str:
    """The markdown report."""
    best = merged(rows)
    zoo = list(best.values())
    hf_named = [r for r in zoo if r["source"] == "hf" and r.get("named")
                and r["status"] not in NOT_RUN]
    tv_named = [r for r in zoo if r["source"] == "torchvision" and r.get("named")]
    sources = sorted({r["source"] for r in rows}, key=SOURCE_ORDER.index)
    notes = meta.get("notes")
    timm_zoo = [r for r in zoo if r["source"] == "timm"]
    clip = [r for r in zoo if r["source"] == "open_clip"]
    reps = [best[r["key"]] for r in rows if r["tier"] == "numeric" and r["source"] == "timm"]
    named_timm = [r for r in timm_zoo if r.get("named")]
    clip_vit = [r for r in clip if r.get("named")]
    false_certs = [r for r in rows if is_false_certificate(r)]
    changed = [r for r in rows if r.get("forward_identical") is False]
    broken = [r for r in rows if r.get("stage") == "forward_transformed"]
    internal = [r for r in rows if r["status"] in ("internal error", "harness error")]
    out = [
        "# Coverage of libra_transform over " + _and([SOURCE_TITLES[s] for s in sources]),
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}; "
        f"{meta['workers']} worker processes × {meta['threads_per_worker']} threads; "
        f"wall time {meta['wall_seconds'] / 60:.1f} min, {meta['rows_from_cache']} rows "
        f"from the cache). Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "."
        + _reused(meta),
        "",
        *([f"Why each blocker is what it is, and what would lift it: [{notes}]({notes}).", ""]
          if notes else []),
        "Random weights throughout. timm and open_clip: **static tier**: every model of the "
        "named timm families and every open_clip config (image tower), built on the meta "
        "device: trace, rewrite, certificate. **numeric tier**: the smallest variant of every "
        "timm family (timm's "
        f"`test_*` toy configurations excluded) and every open_clip config under "
        f"{meta['param_cap'] / 1e6:.0f}M image-tower parameters, with weights perturbed by "
        "0.02·N(0,1), eval mode, batch 1, default input size: also the forward (bit-identity, "
        "with and without grad) and the relative completeness error "
        "|f − Σx·∂f/∂x − Σb·∂f/∂b| / |f| of the rewritten and of the original model, in float64 "
        "(and of the rewritten one in float32); target the argmax class, or output[:, 0] for an "
        "embedding.",
        "",
        "## Summary",
        "",
        "| scope | models | traced by fx | traced by export | trace failed | not traced (other) "
        "| certified complete | forward identical (numeric) | rel. error ≤ 1e-4 (numeric) |",
        "|---|---|---|---|---|---|---|---|---|",
        _summary_row("whole zoo (distinct models)", zoo),
        _summary_row("timm: smallest of each family", reps),
        _summary_row("timm: named families, every model", named_timm),
        _summary_row("open_clip: every config", clip),
        _summary_row("open_clip: ViT configs", clip_vit),
        *[_summary_row(label, [r for r in zoo if r["source"] == src]) for src, label in (
            ("hf", "Hugging Face: every class (the built ones measured)"),
            ("torchvision", "torchvision: every model")) if src in sources],
        "",
        "\"Not traced (other)\": the model could not be built, timed out, crashed, or failed "
        "after tracing (see the blockers below). \"Forward identical\": a transformed model "
        "that fails to run where the original runs counts as not identical.",
        "",
        "## The promises",
        "",
        f"Over every row of every section ({_and([SOURCE_TITLES[s] for s in sources])}).",
        "",
        f"- False certificates (certified, float64 relative error > {COMPLETE_TOL:g}): "
        f"**{len(false_certs)}**" + _names(false_certs),
        f"- Transforms that changed a forward output: **{len(changed)}**" + _names(changed),
        f"- Transformed models that failed to run where the model itself runs: **{len(broken)}**"
        + _names(broken),
        *[_certified_line(label, members) for label, members in (
            ("Named timm families (ViT, DeiT, BEiT, EVA, CaiT, Swin v1/v2/v2-cr, MLP-Mixer/"
             "ResMLP/gMixer/gMLP, PiT, XCiT)", named_timm),
            ("open_clip ViT configs", clip_vit),
            ("Hugging Face families issue 14 names (ViT, DeiT, BEiT, DINOv2, CLIP, SigLIP, Swin, "
             "ConvNeXt, BERT, RoBERTa, GPT-2, Llama, Qwen2, Mistral, Gemma 1-3), every class "
             "built (eager and sdpa rows)", hf_named),
            ("torchvision models issue 14 names", tv_named)) if members],
        f"- Raw internal exceptions (not a LibraError): **{len(internal)}**" + _names(internal),
        *error_stats(rows, _names),
        "",
        "## What blocks the rest",
        "",
        "Every model of the zoo that is not certified complete, or whose run ended in an error, "
        "grouped by reason (the first two distinct violations name an uncertified model).",
        "",
    ]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in zoo:
        if r["status"] != "no small config" and (why := blocker(r)) is not None:
            groups[why].append(r)
    out += ["| reason | models | which |", "|---|---|---|"]
    for why, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        names = ", ".join(f"`{r['key']}`" for r in members)
        out.append(f"| {_escape(why)} | {len(members)} | {names} |")
    out += skipped_notes(rows, meta)
    out += [""]
    out += hf_section(rows, _summary_row, MODEL_HEADER, _model_row, _names, _escape)
    out += torchvision_section(rows, _summary_row, MODEL_HEADER, _model_row, _names)
    if "timm" in sources or "open_clip" in sources:
        out += ["## Per family (timm and open_clip)", ""]
    families: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["status"] != "skipped" and r["source"] in ("timm", "open_clip"):
            families[r.get("family") or "?"].append(r)
    for fam in sorted(families, key=lambda f: (f.startswith("open_clip"), f)):
        members = sorted(families[fam], key=lambda r: (r["tier"] != "numeric", r["name"]))
        certified = _count(members, lambda r: r.get("certified") is True)
        out += [f"### {fam}", "", f"{_pct(certified, len(members))} certified complete.", ""]
        out += MODEL_HEADER + [_model_row(r) for r in members] + [""]
    return "\n".join(out)


def _names(rows: list[dict], limit: int = 40) -> str:
    if not rows:
        return ""
    names = ", ".join(f"`{r['key']}`" for r in rows[:limit])
    return f": {names}" + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _certified_line(label: str, members: list[dict]) -> str:
    certified = _count(members, lambda r: r.get("certified") is True)
    return (f"- {label} certified complete: {_pct(certified, len(members))}"
            + _names([r for r in members if not r.get("certified")]))


def write_report(rows: list[dict], meta: dict, out: Path) -> Path:
    """Write ``out/coverage.md`` and ``out/coverage.json``; returns the markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "coverage-notes.md").exists():  # linked only where it is
        meta = {**meta, "notes": "coverage-notes.md"}
    md = out / "coverage.md"
    md.write_text(render(rows, meta) + "\n")
    (out / "coverage.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return md
