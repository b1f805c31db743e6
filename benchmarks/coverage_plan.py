"""Which (model, tier) jobs a coverage sweep runs, per section, and which models it skips.

Sections: ``timm`` and ``open_clip`` (static tier on every model of the named families and every
config, numeric tier on the smallest of each timm family and the open_clip towers under the
cap), ``hf`` (numeric tier on every class of coverage_hf, tiny configs) and ``torchvision``
(static tier on every classification model, numeric on the smallest of each family).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SECTIONS = ("timm", "open_clip", "hf", "torchvision")
QUICK_STATIC = ("timm:vit_tiny_patch16_224", "timm:swin_tiny_patch4_window7_224",
                "timm:xcit_nano_12_p16_224", "open_clip:RN50", "open_clip:ViT-B-32",
                "torchvision:swin_t")
QUICK_NUMERIC = ("timm:vit_tiny_patch16_224", "timm:resnet18", "timm:gmlp_ti16_224",
                 "open_clip:ViT-S-32", "hf:ViTForImageClassification",
                 "hf:BertForSequenceClassification", "hf:LlamaForCausalLM",
                 "torchvision:squeezenet1_1")


def sections(args: argparse.Namespace) -> tuple[str, ...]:
    """The sections this sweep runs (``--only``, default all)."""
    chosen = tuple(args.only.split(",")) if args.only else SECTIONS
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return chosen


def _progress(total: int, desc: str):
    from benchmarks.coverage import _progress as bar

    return bar(total, desc)


def param_counts(families: list[str], args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """Parameter counts (built on meta) of every model of ``families``, cached per version."""
    import open_clip
    import timm

    path = cache / f"params-timm{timm.__version__}-open_clip{open_clip.__version__}.json"
    counts: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    missing = [f for f in families if f"family:{f}" not in counts]
    if missing:
        from benchmarks.coverage_pool import run_jobs

        bar = _progress(len(missing), "counting parameters")

        def on_result(job: dict, result: Any, failure: str | None) -> None:
            counts.update(result or {})
            counts[f"family:{job['key']}"] = failure or "ok"
            path.write_text(json.dumps(counts, indent=0))
            if bar is not None:
                bar.update()

        run_jobs([{"tier": "count", "key": f} for f in missing], workers=args.workers,
                 threads=1, timeout=lambda job: 900.0, logdir=cache, on_result=on_result)
    return counts


def _skip(key: str, params: int | None, why: str) -> dict:
    from benchmarks.coverage_models import family, is_named, split_key

    source, name = split_key(key)
    return {"key": key, "tier": "numeric", "source": source, "name": name,
            "family": family(key), "named": is_named(key), "params": params,
            "status": "skipped", "error": why}


def _over_cap(params: int | None, cap: int) -> str | None:
    if params is not None and params > cap:
        return f"{params / 1e6:.0f}M parameters > cap {cap / 1e6:.0f}M"
    return None


def plan_timm_clip(args: argparse.Namespace, cache: Path, chosen_sections: tuple[str, ...]
                   ) -> tuple[list[str], list[str], list[dict], dict[str, Any]]:
    """timm and open_clip: static keys, numeric keys, skipped rows, parameter counts."""
    from benchmarks.coverage_models import (
        NAMED_FAMILIES,
        image_tower,
        open_clip_names,
        smallest,
        timm_families,
    )

    tiers = args.tiers.split(",")
    fams = timm_families()
    default = [*fams] * ("timm" in chosen_sections) + ["open_clip"] * (
        "open_clip" in chosen_sections)
    chosen = args.families.split(",") if args.families else default
    unknown = [f for f in chosen if f not in fams and f != "open_clip"]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; timm.list_modules() lists them")
    clip = [f"open_clip:{n}" for n in open_clip_names()] if "open_clip" in chosen else []
    static = [f"timm:{n}" for f in chosen if f in NAMED_FAMILIES for n in fams[f]] + clip
    numeric: list[str] = []
    skipped: list[dict] = []
    counts: dict[str, Any] = {}
    if "numeric" in tiers:
        counts = param_counts(chosen, args, cache)
        reps = [smallest(counts, [f"timm:{n}" for n in fams[f]]) for f in chosen if f in fams]
        towers: dict[str, str] = {}
        # the shortest name stands for configs sharing an image tower (ViT-B-32, not mt5-...)
        for key in [k for k in reps if k] + sorted(clip, key=lambda k: (len(k), k)):
            why = _over_cap(counts.get(key), args.cap)
            if why is None and (same := towers.setdefault(image_tower(key), key)) != key:
                why = f"same image tower as {same}"
            if why is None:
                numeric.append(key)
                continue
            if key not in static:  # not run numerically: still read its certificate
                static.append(key)
            skipped.append(_skip(key, counts.get(key), why))
    return static, numeric, skipped, counts


def plan_torchvision(args: argparse.Namespace) -> tuple[list[str], list[str], list[dict]]:
    """torchvision: every model static, the smallest of each family numeric (under the cap)."""
    from benchmarks import coverage_tv as tv

    static = [f"torchvision:{n}" for n in tv.names()]
    numeric, skipped = [], []
    for name in tv.smallest_per_family():
        key = f"torchvision:{name}"
        why = _over_cap(tv.param_count(name), args.cap)
        if why is None:
            numeric.append(key)
        else:
            skipped.append(_skip(key, tv.param_count(name), why))
    return static, numeric, skipped


def plan(args: argparse.Namespace, cache: Path) -> tuple[list[tuple[str, str]], list[dict]]:
    """The (key, tier) jobs to run, and the rows of models skipped for size."""
    from benchmarks.coverage_models import pixels, split_key

    tiers = args.tiers.split(",")
    chosen = sections(args)
    if args.keys or args.quick:  # exactly these models, in each tier asked for (hf: numeric)
        keys = args.keys.split(",") if args.keys else []
        jobs = [(k, "static") for k in keys or QUICK_STATIC]
        jobs += [(k, "numeric") for k in keys or QUICK_NUMERIC]
        return [(k, t) for k, t in jobs if t in tiers and split_key(k)[0] in chosen
                and (t == "numeric" or not k.startswith("hf:"))], []
    static: list[str] = []
    numeric: list[str] = []
    skipped: list[dict] = []
    counts: dict[str, Any] = {}
    if "timm" in chosen or "open_clip" in chosen or args.families:
        static, numeric, skipped, counts = plan_timm_clip(args, cache, chosen)
    if "torchvision" in chosen:
        tv_static, tv_numeric, tv_skipped = plan_torchvision(args)
        from benchmarks import coverage_tv as tv

        counts |= {f"torchvision:{n}": tv.param_count(n) for n in tv.names()}
        static, numeric, skipped = static + tv_static, numeric + tv_numeric, skipped + tv_skipped
    if args.limit:
        static, numeric = static[:args.limit], numeric[:args.limit]
    # the slowest (parameters x pixels) first, so that no long job starts last
    numeric.sort(key=lambda k: -(counts.get(k) or 0) * pixels(k))
    if "hf" in chosen:  # tiny configs: seconds each, after the big ones
        from benchmarks import coverage_hf as hf

        numeric += hf.keys(named_sdpa=not args.no_sdpa)[:args.limit or None]
    jobs = [(k, "numeric") for k in numeric] * ("numeric" in tiers)
    jobs += [(k, "static") for k in static] * ("static" in tiers)
    return jobs, skipped
