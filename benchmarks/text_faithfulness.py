"""The text benchmark: gradient methods, vanilla and Libra, on the synthetic key-token task's
encoder (BERT) and decoder (Llama), scored against the known evidence (the key's position)
and by token deletion, with LXT's AttnLRP as the peer row (run in its own process)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import libragrad_fx
from benchmarks.text_scoring import score_map
from benchmarks.text_task import NAMES, load_text_model, make_sequences
from libragrad_fx.metrics import completeness_gap

METHODS = ("gradient", "input_x_gradient", "fullgrad", "fullgrad+", "integrated_gradients")
METRICS = ("srg", "mif", "lif", "evidence_ap", "completeness", "seconds")
EVAL_SEED = 2  # training used 0, the accuracy check 1
PEER = "LXT AttnLRP"
ROOT = Path(__file__).resolve().parents[1]


def _rows(name: str, ids: torch.Tensor, labels: torch.Tensor, evidence: torch.Tensor
          ) -> dict[str, dict[str, dict[str, float]]]:
    model = load_text_model(name)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for libra in (False, True):  # compile each form once, outside the timings
        libragrad_fx.explain(model, input_ids=ids[:1], target=labels[:1], libra=libra)
    for method in METHODS:
        rows[method] = {}
        for form, libra in (("vanilla", False), ("libra", True)):
            start = time.perf_counter()
            e = libragrad_fx.explain(model, input_ids=ids, target=labels, method=method,
                                     libra=libra)
            seconds = (time.perf_counter() - start) / len(ids)
            row = score_map(model, ids, labels, evidence, e.token_map)
            row.update(completeness=completeness_gap(e).mean().item(), seconds=seconds)
            rows[method][form] = row
    return rows


def _peers(count: int) -> dict[str, dict[str, float | str]]:
    """The peer rows from a fresh process, so LXT's patches never reach ours."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "peer.json"
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.text_faithfulness", "--peer-only",
             "--sequences", str(count), "--json", str(path)],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ}, timeout=600)
        if done.returncode != 0 or not path.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return {name: {"reason": f"peer process failed: {tail[0]}"} for name in NAMES}
        return json.loads(path.read_text())


def run_text(count: int, quick: bool) -> dict:
    """{model: {method: {"vanilla": {metric: mean}, "libra": {...}}, "peers": {PEER: ...}}}
    over ``count`` sequences (4 with ``quick``)."""
    count = min(count, 4) if quick else count
    ids, labels, evidence = make_sequences(count, EVAL_SEED)
    result = {name: _rows(name, ids, labels, evidence) for name in NAMES}
    peers = _peers(count)
    for name in NAMES:
        result[name]["peers"] = {PEER: peers.get(name, {"reason": "no peer row"})}
    return result


def text_claims(result: dict) -> list[tuple[str, str, bool, str]]:
    """Per model: Libra input×gradient ranks the key token better than vanilla (AP)."""
    claims = []
    for name in NAMES:
        row = result[name]["input_x_gradient"]
        vanilla, libra = row["vanilla"]["evidence_ap"], row["libra"]["evidence_ap"]
        claims.append((name, "Libra IxG evidence-token AP > vanilla IxG", libra > vanilla,
                       f"vanilla {vanilla:.2f}, Libra {libra:.2f}"))
    return claims


def _cell(value: float, metric: str) -> str:
    if metric == "completeness":
        return f"{value:.1e}"
    return f"{value * 1e3:.2f} ms" if metric == "seconds" else f"{value:.3f}"


def markdown_text(result: dict) -> list[str]:
    """"## Text benchmark" and one table per model; cells "vanilla → Libra"."""
    lines = ["## Text benchmark", "",
             "Synthetic key-token task (one key per 16-token sequence decides the class of 4); "
             "tokens removed by PAD (id 0); evidence = the key's position.", ""]
    head = ["srg", "mif", "lif", "evidence AP", "completeness", "s/sequence"]
    for name in NAMES:
        lines += [f"### {name}", "", "| method | " + " | ".join(head) + " |",
                  "|---" * (len(head) + 1) + "|"]
        for method in METHODS:
            v, lib = result[name][method]["vanilla"], result[name][method]["libra"]
            cells = [f"{_cell(v[m], m)} → {_cell(lib[m], m)}" for m in METRICS]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        for peer, row in result[name]["peers"].items():
            if "reason" in row:
                lines.append(f"| {peer} | {row['reason']} |" + " |" * (len(head) - 1))
            else:
                lines.append(f"| {peer} | " + " | ".join(_cell(row[m], m) for m in METRICS)
                             + " |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sequences", type=int, default=200)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.peer_only:
        from benchmarks.text_peer import peer_rows

        result = peer_rows(*make_sequences(args.sequences, EVAL_SEED))
    else:
        result = run_text(args.sequences, args.quick)
        print("\n".join(markdown_text(result)))
        for claim in text_claims(result):
            print(claim)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
