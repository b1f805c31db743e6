"""Coverage sweep: which timm and open_clip models libra_transform handles, and how well.

    python -m benchmarks.coverage [--quick] [--families F,G] [--limit N] [--out DIR] [--fresh]
    python -m benchmarks.coverage --one timm:vit_tiny_patch16_224 --tier numeric

Two tiers (random weights everywhere, nothing downloaded):

- static: every model of the named timm families and every open_clip config (image tower),
  built on the meta device; traced by (fx / export / failed), rewrites per rule, certificate.
- numeric: the smallest variant of every timm family and the open_clip configs whose image tower
  is under ``--cap`` parameters, with perturbed random weights at the default input size: the
  above, plus forward bit-identity and the completeness error of the rewritten and the original
  model in float64.

Each model runs in a worker subprocess with a timeout. Finished rows are cached in
``benchmarks/build/coverage/`` so that a rerun resumes (``--fresh`` starts over). Writes
``OUT/coverage.md`` and ``OUT/coverage.json`` (default ``docs/``).
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / "build" / "coverage"
PARAM_CAP = 120_000_000
QUICK_STATIC = ("timm:vit_tiny_patch16_224", "timm:swin_tiny_patch4_window7_224",
                "timm:xcit_nano_12_p16_224", "open_clip:RN50", "open_clip:ViT-B-32")
QUICK_NUMERIC = ("timm:vit_tiny_patch16_224", "timm:resnet18", "timm:gmlp_ti16_224",
                 "open_clip:ViT-S-32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a handful of models (output to cache)")
    p.add_argument("--families", help="comma-separated timm families (and/or open_clip)")
    p.add_argument("--limit", type=int, help="at most N models per tier")
    p.add_argument("--out", type=Path, help="where coverage.md/.json go (default docs/)")
    p.add_argument("--fresh", action="store_true", help="ignore cached rows")
    p.add_argument("--cache", type=Path, help=f"cache folder (default {CACHE.relative_to(ROOT)})")
    p.add_argument("--tiers", default="static,numeric")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cap", type=int, default=PARAM_CAP, help="numeric tier: max parameters")
    p.add_argument("--timeout-static", type=float, default=120.0)
    p.add_argument("--timeout-numeric", type=float, default=300.0)
    p.add_argument("--one", metavar="KEY", help="run one model in-process, print its JSON row")
    p.add_argument("--tier", default="numeric", help="the tier of --one")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _read_jsonl(path: Path) -> dict[tuple[str, str], dict]:
    rows: dict[tuple[str, str], dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[(row["key"], row["tier"])] = row
    return rows


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the bench extra
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


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


def plan(args: argparse.Namespace, cache: Path) -> tuple[list[tuple[str, str]], list[dict]]:
    """The (key, tier) jobs to run, and the rows of models skipped for size."""
    from benchmarks.coverage_models import (
        NAMED_FAMILIES,
        family,
        image_tower,
        is_named,
        open_clip_names,
        pixels,
        smallest,
        split_key,
        timm_families,
    )

    tiers = args.tiers.split(",")
    if args.quick:
        jobs = [(k, "static") for k in QUICK_STATIC] + [(k, "numeric") for k in QUICK_NUMERIC]
        return [j for j in jobs if j[1] in tiers], []
    fams = timm_families()
    chosen = args.families.split(",") if args.families else [*fams, "open_clip"]
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
            source, name = split_key(key)
            why = None
            if counts.get(key) is not None and counts[key] > args.cap:
                why = f"{counts[key] / 1e6:.0f}M parameters > cap {args.cap / 1e6:.0f}M"
            elif (same := towers.setdefault(image_tower(key), key)) != key:
                why = f"same image tower as {same}"
            if why is None:
                numeric.append(key)
                continue
            if key not in static:  # not run numerically: still read its certificate
                static.append(key)
            skipped.append({"key": key, "tier": "numeric", "source": source, "name": name,
                            "family": family(key), "named": is_named(key),
                            "params": counts.get(key), "status": "skipped", "error": why})
    if args.limit:
        static, numeric = static[:args.limit], numeric[:args.limit]
    # the slowest (parameters x pixels) first, so that no long job starts last
    numeric.sort(key=lambda k: -(counts.get(k) or 0) * pixels(k))
    jobs = [(k, "numeric") for k in numeric]
    jobs += [(k, "static") for k in static] * ("static" in tiers)
    return jobs, skipped


def failure_row(job: dict, failure: str) -> dict:
    """The row of a job whose worker timed out or died."""
    from benchmarks.coverage_models import family, is_named, split_key

    source, name = split_key(job["key"])
    status = failure.split(":", 1)[0]
    return {"key": job["key"], "tier": job["tier"], "source": source, "name": name,
            "family": family(job["key"]), "named": is_named(job["key"]), "traced_by": None,
            "certified": None, "status": status, "error_type": status, "error": failure,
            "seconds": job.get("seconds")}


def sweep(args: argparse.Namespace) -> Path:
    """Run the sweep and write the report; returns the markdown file."""
    from benchmarks.coverage_pool import run_jobs
    from benchmarks.coverage_report import write_report

    start = time.perf_counter()
    cache = args.cache or (CACHE / "quick" if args.quick else CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    lock = (cache / "lock").open("w")
    try:  # two sweeps appending to one cache would mix their rows
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another coverage sweep is using {cache}; wait for it or pass "
                         "--cache DIR") from None
    rows_path = cache / "rows.jsonl"
    if args.fresh and rows_path.exists():
        rows_path.unlink()
    done = _read_jsonl(rows_path)
    jobs, skipped = plan(args, cache)
    todo = [{"key": k, "tier": t} for k, t in jobs if (k, t) not in done]
    bar = _progress(len(todo), "coverage")

    def on_result(job: dict, result: Any, failure: str | None) -> None:
        row = failure_row(job, failure) if failure else result
        done[(row["key"], row["tier"])] = row
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if bar is not None:
            bar.set_postfix_str(f"{row['key']} {row['status']}"[-50:])
            bar.update()

    threads = max(1, (os.cpu_count() or 1) // max(1, args.workers))
    timeouts = {"static": args.timeout_static, "numeric": args.timeout_numeric}
    run_jobs(todo, workers=args.workers, threads=threads, logdir=cache,
             timeout=lambda job: timeouts[job["tier"]], on_result=on_result)
    if bar is not None:
        bar.close()
    rows = [done[j] for j in jobs if j in done] + skipped
    import open_clip
    import timm
    import torch

    meta = {
        "command": "python -m benchmarks.coverage " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "rows_from_cache": len(jobs) - len(todo),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "workers": args.workers, "threads_per_worker": threads, "param_cap": args.cap,
        "timeouts": timeouts,
        "versions": {"torch": torch.__version__, "timm": timm.__version__,
                     "open_clip": open_clip.__version__},
    }
    out = args.out or (cache if args.quick else ROOT / "docs")
    return write_report(rows, meta, out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        from benchmarks.coverage_pool import serve

        serve(args.threads)
    elif args.one:
        import torch

        torch.set_num_threads(args.threads)
        from benchmarks.coverage_run import run_model

        print(json.dumps(run_model(args.one, args.tier)))
    else:
        path = sweep(args)
        print(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
