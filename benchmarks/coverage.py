"""Coverage sweep: which timm, open_clip, Hugging Face and torchvision models libra_transform
handles, and how well.

    python -m benchmarks.coverage [--quick] [--only SECTIONS] [--families F,G] [--limit N]
                                  [--out DIR] [--fresh] [--reuse FILE]
    python -m benchmarks.coverage --only hf,torchvision     # the other sections' rows reused
    python -m benchmarks.coverage --one timm:vit_tiny_patch16_224 --tier numeric
    python -m benchmarks.coverage --only hf --keys hf:LlamaForCausalLM,hf:GPT2LMHeadModel
    python -m benchmarks.coverage --one hf:LlamaForCausalLM@sdpa

Sections (``--only``, default all): timm, open_clip, hf, torchvision. Two tiers (random weights
everywhere, nothing downloaded):

- static: every model of the named timm families and every open_clip config (image tower),
  built on the meta device; traced by (fx / export / failed), rewrites per rule, certificate.
- numeric: the smallest variant of every timm family and the open_clip configs whose image tower
  is under ``--cap`` parameters, with perturbed random weights at the default input size: the
  above, plus forward bit-identity and the completeness error of the rewritten and the original
  model in float64.
- hf: every ``*ForImageClassification``, ``*ForSequenceClassification`` and ``*ForCausalLM``
  class of transformers' auto mappings, numeric tier only, from a tiny config built generically
  (benchmarks/coverage_hf.py; eager attention, plus an ``@sdpa`` row for the families issue 14
  names); a class that does not build from a small config is reported, not counted against us.
- torchvision: every classification model static, the smallest of each family numeric.

With ``--only``, the rows of the sections not run come from the cache, else from ``--reuse``
(default: the previous OUT/coverage.json), so that the report stays whole without rerunning them.
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a handful of models (output to cache)")
    p.add_argument("--only", metavar="SECTIONS",
                   help="comma-separated sections to run: timm, open_clip, hf, torchvision "
                        "(default all); the others' rows are reused")
    p.add_argument("--reuse", type=Path, metavar="FILE",
                   help="a previous coverage.json whose rows stand for the sections not run "
                        "(default OUT/coverage.json; only with --only)")
    p.add_argument("--no-sdpa", action="store_true", help="hf: eager rows only")
    p.add_argument("--keys", metavar="K1,K2",
                   help="run exactly these models (e.g. hf:LlamaForCausalLM@sdpa,"
                        "torchvision:swin_t) in each of --tiers")
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
    p.add_argument("--timeout-hf", type=float, default=120.0, help="per hf class")
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


def failure_row(job: dict, failure: str) -> dict:
    """The row of a job whose worker timed out or died."""
    from benchmarks.coverage_models import family, is_named, split_key

    source, name = split_key(job["key"])
    status = failure.split(":", 1)[0]
    return {"key": job["key"], "tier": job["tier"], "source": source, "name": name,
            "family": family(job["key"]), "named": is_named(job["key"]), "traced_by": None,
            "certified": None, "status": status, "error_type": status, "error": failure,
            "seconds": job.get("seconds")}


def reuse(args: argparse.Namespace, out: Path, done: dict[tuple[str, str], dict],
          run: tuple[str, ...]) -> tuple[list[dict], dict | None]:
    """Rows of the sections not run: from the cache, else from a previous coverage.json (with
    its skipped rows); and which report they came from."""
    rows = {k: r for k, r in done.items() if r["source"] not in run}
    path = args.reuse or out / "coverage.json"
    source = None
    if path.exists():
        previous = json.loads(path.read_text())
        for r in previous["rows"]:
            if r["source"] not in run:
                rows.setdefault((r["key"], r["tier"]), r)
        meta = previous.get("meta", {})
        source = {"path": str(path), "command": meta.get("command"), "date": meta.get("date")}
    return list(rows.values()), source


def sweep(args: argparse.Namespace) -> Path:
    """Run the sweep and write the report; returns the markdown file."""
    from benchmarks.coverage_plan import plan, sections
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
    timeouts = {"static": args.timeout_static, "numeric": args.timeout_numeric,
                "hf": args.timeout_hf}
    run_jobs(todo, workers=args.workers, threads=threads, logdir=cache, on_result=on_result,
             timeout=lambda job: timeouts["hf" if job["key"].startswith("hf:") else job["tier"]])
    if bar is not None:
        bar.close()
    out = args.out or (cache if args.quick else ROOT / "docs")
    rows = [done[j] for j in jobs if j in done] + skipped
    reused, reused_from = ([], None) if args.quick or args.only is None else reuse(
        args, out, done, sections(args))
    rows += reused
    import open_clip
    import timm
    import torch
    import torchvision
    import transformers

    meta = {
        "command": "python -m benchmarks.coverage " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "rows_from_cache": len(jobs) - len(todo),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "workers": args.workers, "threads_per_worker": threads, "param_cap": args.cap,
        "timeouts": timeouts,
        "versions": {"torch": torch.__version__, "timm": timm.__version__,
                     "open_clip": open_clip.__version__, "transformers": transformers.__version__,
                     "torchvision": torchvision.__version__},
        "sections": list(sections(args)), "rows_reused": len(reused), "reused_from": reused_from,
    }
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
