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
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from benchmarks import shards, tables
from benchmarks.peers import PEERS, measure_peer
from libragrad_fx import METHODS, Explainer, explain
from libragrad_fx.digits import data, models
from libragrad_fx.metrics import (
    average_precision,
    class_discrimination,
    completeness_gap,
    token_removal,
)

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = ("attention", "rollout", "genatt", "gradsam", "attcat", "tokentm")
# methods whose map is read off a gradient (the Libra switch changes them)
GRADIENT = tuple(m for m in METHODS if m not in ("attention", "rollout"))
COMPLETE = ("fullgrad", "fullgrad+", "integrated_gradients")
METRICS = ("srg", "mif", "lif", "srg_accuracy", "completeness", "ap", "discrimination")


class ZeroShot(nn.Module):
    """A CLIP as a ten-class classifier: 100·cos(image, caption) for each caption."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        with torch.no_grad():
            text = clip.encode_text(models.tokenize_captions(), normalize=True)
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


def markdown(result: dict, meta: dict) -> str:
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
    lines += [f"| {n} | {c} | {'n/a' if ok is None else 'yes' if ok else '**no**'} | {ev} |"
              for n, c, ok, ev in claims(result)]
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
    return "\n".join(lines) + "\n"


def _seconds(cell: dict) -> str:
    return "could not run" if "reason" in cell else f"{cell['seconds'] * 1000:.0f} ms/image"


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
    real = parser.add_argument_group(
        "a labelled image folder (benchmarks.real_data): --data DIR --model NAME --protocol P")
    real.add_argument("--data", type=Path, default=None,
                      help="class subfolders DIR/<class>/<image>, or images listed by --list")
    real.add_argument("--list", type=Path, default=None, help="lines 'relative/path label'")
    real.add_argument("--classes", type=Path, default=None,
                      help="class names (folder names) one per line in the model's class order; "
                           "default: the sorted folder names")
    real.add_argument("--masks", type=Path, default=None,
                      help="ImageNet-S masks: MASKS/<relative path>.png, 0 = background")
    real.add_argument("--split", default="all", choices=("all", "single", "multi"),
                      help="with --masks: single-object images, multi-object ones, or all")
    real.add_argument("--model", nargs="+", default=None,
                      help="as the CLI takes it: digits:vit, a timm name, open_clip:NAME, "
                           "module:attr; several make one column each")
    real.add_argument("--pretrained", nargs="?", const=True, default=None,
                      help="the library's pretrained weights (a tag picks one)")
    real.add_argument("--checkpoint", type=Path, default=None, help="a state_dict file")
    real.add_argument("--protocol", default="libragrad", choices=("libragrad", "reslrp"))
    real.add_argument("--seed", type=int, default=None, help="default: the protocol's (0)")
    real.add_argument("--ablation", action="store_true",
                      help="FullGrad+ with each rule off in turn (Table 5)")
    real.add_argument("--batch", type=int, default=8, help="images per explanation call")
    real.add_argument("--prompt", default="a photo of a {}",
                      help="a CLIP model's prompt for each class name")
    real.add_argument("--out-dir", type=Path, default=ROOT / "build" / "faithfulness")
    real.add_argument("--resume", action="store_true",
                      help="keep the rows already in --out-dir and measure only the rest")
    args = parser.parse_args(argv)
    if args.data is not None:
        from benchmarks import real_data

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
    meta = {"command": "python -m benchmarks.faithfulness" + (" --quick" if args.quick else ""),
            "images": count, "seconds": time.perf_counter() - start, "processes": size}
    text = markdown(result, meta)
    print(text)
    out = args.out or (None if args.quick else ROOT / "docs" / "results.md")
    if out is not None:
        out.write_text(text)
    json_path = args.json or (None if args.quick else ROOT / "docs" / "results.json")
    if json_path is not None:
        json_path.write_text(json.dumps({"meta": meta, "results": result}, indent=1))


if __name__ == "__main__":
    main()
