"""Peak memory of integrated gradients against internal_batch_size, on a timm ViT.

    python -m benchmarks.explain_memory [--quick] [--json PATH]

explain(method="integrated_gradients") runs steps x batch rows in chunks of
internal_batch_size, so its memory should grow with the chunk, not with steps x batch; this
shows it. Peak RSS only ever rises, so each row runs in a fresh subprocess: it builds the model
(random weights, eval), warms up with a one-step explain on one image (compiling the form),
takes ru_maxrss as the baseline, runs the measured explain and takes ru_maxrss again. The last
row reruns one chunk size with more steps: its increment should not grow.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# extra: one more row, libra, at (steps, internal_batch_size); threads None: torch's default
FULL = dict(model="vit_base_patch16_224", batch=8, steps=50, sizes=(8, 16, 32, 64), extra=(100, 16))
FULL["threads"] = None
# one thread: on a busy machine OpenMP threads of tiny ops spin, and 1 s becomes 30 s
QUICK = dict(model="vit_tiny_patch16_224", batch=2, steps=4, sizes=(2, 8), extra=None, threads=1)


def configs(plan: dict) -> list[dict]:
    """A row per (internal_batch_size, libra), then one libra row at (extra steps, size)."""
    base = {"model": plan["model"], "batch": plan["batch"], "threads": plan.get("threads")}
    rows = [
        {**base, "steps": plan["steps"], "internal_batch_size": size, "libra": libra}
        for size in plan["sizes"]
        for libra in plan.get("libra", (False, True))
    ]
    if plan.get("extra"):
        steps, size = plan["extra"]
        rows.append({**base, "steps": steps, "internal_batch_size": size, "libra": True})
    return rows


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(config: dict) -> dict:
    """Run one configuration in this process (meant to be a fresh one); return its row."""
    import timm
    import torch

    from libragrad_fx import explain

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    model = timm.create_model(config["model"], pretrained=False).eval()
    x = torch.randn(config["batch"], 3, 224, 224)
    libra, size, steps = config["libra"], config["internal_batch_size"], config["steps"]
    ig = {"target": 0, "method": "integrated_gradients", "libra": libra}
    explain(model, x[:1], steps=1, internal_batch_size=1, **ig)  # warm-up: one row
    baseline = _max_rss_mib()
    start = time.perf_counter()
    result = explain(model, x, steps=steps, internal_batch_size=size, **ig)
    wall = time.perf_counter() - start
    peak = _max_rss_mib()
    return {
        **config,
        "threads": torch.get_num_threads(),
        "wall_s": wall,
        "baseline_mib": baseline,
        "peak_mib": peak,
        "increment_mib": peak - baseline,
        "chunks": math.ceil(steps * config["batch"] / size),
        "finite": bool(torch.isfinite(result.total).all()),
    }


def run_fresh(config: dict) -> dict:
    """measure(config) in a new Python process, so no other row's peak leaks in."""
    command = [sys.executable, "-m", "benchmarks.explain_memory", "--child", json.dumps(config)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child failed for {config}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_all(plan: dict, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    rows = []
    bar = tqdm(configs(plan), disable=not progress, unit="run")
    for config in bar:
        bar.set_postfix(size=config["internal_batch_size"], libra=config["libra"])
        rows.append(run_fresh(config))
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "internal_batch_size",
        "libra",
        "steps",
        "wall s",
        "baseline MiB",
        "peak MiB",
        "peak-baseline MiB",
    )
    body = [
        (
            str(r["internal_batch_size"]),
            str(r["libra"]),
            str(r["steps"]),
            f"{r['wall_s']:.1f}",
            f"{r['baseline_mib']:.0f}",
            f"{r['peak_mib']:.0f}",
            f"{r['increment_mib']:.0f}",
        )
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]
    lines = [head, tuple("-" * w for w in widths), *body]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="vit_tiny, batch 2, steps 4, internal sizes 2 8, one thread",
    )
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--sizes", type=int, nargs="+", help="internal_batch_size values")
    parser.add_argument(
        "--extra",
        type=int,
        nargs=2,
        metavar=("STEPS", "SIZE"),
        help="the more-steps row (full: 100 16)",
    )
    parser.add_argument("--no-extra", action="store_true", help="skip the more-steps row")
    parser.add_argument("--threads", type=int, help="torch threads in each child")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    plan = dict(QUICK if args.quick else FULL)
    for key in ("model", "batch", "steps", "extra", "threads"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if args.sizes:
        plan["sizes"] = tuple(args.sizes)
    if args.no_extra:
        plan["extra"] = None
    print(
        f"{plan['model']}, batch {plan['batch']}, random weights; RSS in MiB, a fresh "
        "process per row"
    )
    start = time.perf_counter()
    rows = run_all(plan)
    print(table(rows))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
