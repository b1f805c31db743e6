"""Faithfulness of every method, vanilla and LibraGrad, on the trained digits models.

    python -m benchmarks.faithfulness [--quick] [--images N] [--models ...] [--methods ...]
                                      [--json PATH] [--out PATH]
    torchrun --nproc_per_node 2 -m benchmarks.faithfulness ...   (images sharded over processes)

For each shipped model (libragrad_fx.digits) and each method in both forms, on single-digit test
canvases: MIF, LIF and SRG by token removal (DESIGN §5), the completeness error, localisation AP
against the digit's mask; on two-digit canvases, class discrimination (the share of positive
attribution on the queried digit). CLIP is explained as a zero-shot classifier over the ten
captions, 100·cos(image, caption). Writes docs/results.md and a JSON of the per-model means.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from benchmarks import shards
from benchmarks.method_sets import ATTENTION, COMPLETE, GRADIENT, METRICS  # noqa: F401
from benchmarks.peers import PEERS, measure_peer
from benchmarks.results_page import markdown
from libragrad_fx import METHODS, Explainer, explain
from libragrad_fx.digits import data, models
from libragrad_fx.metrics import (
    average_precision,
    class_discrimination,
    completeness_gap,
    token_removal,
)

ROOT = Path(__file__).resolve().parents[1]
TEXT_JSON = ROOT / "docs" / "text-results.json"  # the text benchmark's means, for --render
class ZeroShot(nn.Module):
    """A CLIP as a classifier: 100·cos(image, caption) for each caption's ``tokens`` (by
    default the digits models' ten captions)."""

    def __init__(self, clip: nn.Module, tokens: Tensor | None = None):
        super().__init__()
        self.clip = clip
        tokens = models.tokenize_captions() if tokens is None else tokens
        with torch.no_grad():
            text = clip.encode_text(tokens, normalize=True)
        self.register_buffer("captions", text)
        self.training = False

    def forward(self, images: Tensor) -> Tensor:
        return 100 * self.clip.encode_image(images, normalize=True) @ self.captions.T


def _model(name: str) -> nn.Module:
    model = models.load(name)
    return ZeroShot(model) if name == "clip" else model


def _options(method: str, quick: bool) -> dict:
    if method == "integrated_gradients":
        return {"steps": 8 if quick else 32, "internal_batch_size": 256}
    if method == "smoothgrad":
        return {"base": "input_x_gradient", "samples": 4 if quick else 16,
                "internal_batch_size": 256}
    return {}


def measure(model: nn.Module, method: str, libra: bool, single, two, quick: bool
            ) -> list[dict[str, float]] | None:
    """Per-image metrics of one (model, method, form), or None where the method does not apply."""
    explainer = Explainer(model)
    options = _options(method, quick)
    x, labels = single.images, single.labels
    if method in ATTENTION:
        compiled = explainer.any_compiled(x)
        if all(site is None for site in compiled.structure.attention):
            return None  # a Mixer: nothing to read
        if compiled.layout(x).cls is None:  # mean pooling: average the query rows instead
            options["query"] = "mean"
    e = explain(explainer, x, target=labels, method=method, libra=libra, **options)
    curves = token_removal(explainer, x, e, labels, internal_batch_size=512)
    size = tuple(x.shape[-2:])
    ap = average_precision(e.heatmap(size), single.masks)
    gap = completeness_gap(e)
    shares = []
    for k in (0, 1):
        ek = explain(explainer, two.images, target=two.labels[:, k], method=method, libra=libra,
                     **options)
        shares.append(class_discrimination(ek.heatmap(size), two.masks[:, k],
                                           two.masks[:, 1 - k]))
    share = (shares[0] + shares[1]) / 2
    columns = {
        "srg": curves.srg_probability, "mif": curves.mif_probability_area,
        "lif": curves.lif_probability_area, "srg_accuracy": curves.srg_accuracy,
        "completeness": gap, "ap": ap, "discrimination": share,
    }
    return [{k: float(v[i]) for k, v in columns.items()} for i in range(x.shape[0])]


def _images(count: int) -> tuple[data.DigitImages, data.DigitImages]:
    single = data.make_digits("test", count, seed=1)
    two = data.make_digits("test", count, two=True, seed=2)
    return single, two


def _take(batch: data.DigitImages, index: list[int], device: torch.device) -> data.DigitImages:
    return dataclasses.replace(batch, images=batch.images[index].to(device),
                               labels=batch.labels[index].to(device),
                               masks=batch.masks[index].to(device), sources=batch.sources[index])


def run(names: list[str], methods: list[str], count: int, quick: bool,
        peers: tuple[str, ...] = ()) -> dict:
    """{model: {method: {"vanilla"|"libra": {metric: mean}}, "peers": {peer: {metric: mean}
    or {"reason": why}}}}, gathered on rank 0."""
    rank, _ = shards.world()
    index, device = shards.shard(count), shards.device()
    single, two = _images(count)
    single, two = _take(single, index, device), _take(two, index, device)
    jobs = [(n, m, libra) for n in names for m in methods for libra in (False, True)]
    rows: dict[tuple, list | None] = {}
    loaded: dict[str, nn.Module] = {}
    for name, method, libra in tqdm(jobs, desc=f"faithfulness (rank {rank})", disable=rank != 0):
        if name not in loaded:
            loaded[name] = _model(name).to(device)
        model = loaded[name]
        rows[(name, method, libra)] = measure(model, method, libra, single, two, quick)
    result: dict = {}
    for name in names:  # after ours: LeGrad works on a copy, lxt's patches are undone
        for peer in tqdm(peers, desc=f"peers of {name} (rank {rank})", disable=rank != 0):
            part = measure_peer(loaded[name], peer, single, two)
            gathered = part if isinstance(part, str) else shards.gather(part, count)
            if rank == 0:
                cell = ({"reason": gathered} if isinstance(gathered, str) else
                        {k: _nanmean([row[k] for row in gathered]) for k in gathered[0]})
                result.setdefault(name, {}).setdefault("peers", {})[peer] = cell
    for key, part in rows.items():
        gathered = shards.gather(part or [], count) if part is not None else None
        if rank != 0:
            continue
        name, method, libra = key
        slot = result.setdefault(name, {}).setdefault(method, {})
        if gathered is None:
            slot["libra" if libra else "vanilla"] = None
            continue
        cell = {metric: _nanmean([row[metric] for row in gathered]) for metric in METRICS}
        cell["srg_se"] = _standard_error([row["srg"] for row in gathered])
        slot["libra" if libra else "vanilla"] = cell
    return result


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _standard_error(values: list[float]) -> float:
    """The standard error of the mean, so that a claim decided by a hair shows as one."""
    kept = [v for v in values if not math.isnan(v)]
    if len(kept) < 2:
        return float("nan")
    mean = sum(kept) / len(kept)
    return math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1) / len(kept))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 8 images, two models, four methods")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--models", nargs="*", default=None, choices=models.NAMES)
    parser.add_argument("--methods", nargs="*", default=None, choices=METHODS)
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown output (default docs/results.md; none with --quick)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--peers", nargs="*", default=None, choices=PEERS,
                        help="other projects' maps as rows (default: all; --peers alone: none)")
    from benchmarks import real_data

    real_data.add_arguments(parser)
    parser.add_argument("--text", type=int, default=200,
                        help="sequences of the text benchmark in a full run (0: none)")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the page from --json and docs/text-results.json, no run")
    args = parser.parse_args(argv)
    if args.render:
        return render(args.json or ROOT / "docs" / "results.json", args.out or ROOT / "docs" /
                      "results.md")
    if args.data is not None:
        if not args.model:
            parser.error("--data needs --model")
        real_data.main(args)
        return
    shards.init_from_env()
    rank, size = shards.world()
    names = args.models or (["vit", "mixer"] if args.quick else list(models.NAMES))
    methods = args.methods or (["input_x_gradient", "fullgrad", "fullgrad+", "rollout"]
                               if args.quick else list(METHODS))
    count = args.images or (8 if args.quick else 200)
    torch.manual_seed(0)
    start = time.perf_counter()
    peers = tuple(PEERS if args.peers is None else args.peers)
    result = run(names, methods, count, args.quick, peers)
    if not args.quick and "fullgrad+" in methods:  # Table 5: one rule off at a time
        from benchmarks.ablation import ablate

        loaded = {name: _model(name).to(shards.device()) for name in names}
        for name, forms in ablate(loaded, count, args.quick).items():
            result[name]["fullgrad+"].update(forms)
    if rank != 0:
        return
    command = " ".join(["python -m benchmarks.faithfulness", *(sys.argv[1:] if argv is None
                                                                  else argv)])
    meta = {"command": command,
            "images": count, "seconds": time.perf_counter() - start, "processes": size}
    sequences = None
    if not args.quick and args.text:
        from benchmarks.text_faithfulness import run_text

        sequences = run_text(args.text, quick=False)
        TEXT_JSON.write_text(json.dumps(sequences, indent=1))
    page = markdown(result, meta, sequences)
    print(page)
    out = args.out or (None if args.quick else ROOT / "docs" / "results.md")
    if out is not None:
        out.write_text(page)
    json_path = args.json or (None if args.quick else ROOT / "docs" / "results.json")
    if json_path is not None:
        json_path.write_text(json.dumps({"meta": meta, "results": result}, indent=1))


def render(json_path: Path, out: Path) -> None:
    """The page again from the stored means (and the text benchmark's, if stored): to change
    the page's layout without rerunning the measurements."""
    stored = json.loads(Path(json_path).read_text())
    sequences = json.loads(TEXT_JSON.read_text()) if TEXT_JSON.is_file() else None
    Path(out).write_text(markdown(stored["results"], stored["meta"], sequences))


if __name__ == "__main__":
    main()
