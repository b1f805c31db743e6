"""The faithfulness benchmark on a user's labelled image folder, under a named protocol.

    python -m benchmarks.faithfulness --data DIR [--list FILE] [--masks DIR]
        [--split all|single|multi] --model NAME [NAME ...] [--pretrained [TAG] | --checkpoint F]
        --protocol libragrad|reslrp [--images N] [--seed S] [--methods ...] [--ablation]
        [--batch B] [--out-dir DIR] [--resume]

Each model is loaded as the CLI loads it (``digits:vit``, a timm name, ``open_clip:NAME``,
``module:attr``) with its own preprocessing; a CLIP model is a zero-shot classifier over the
folder's class names (``--prompt``). Images stream from disk a batch at a time. Every
(image, method, form) is one line of ``OUT/MODEL/rows-RANK.jsonl``, written as it is measured,
so ``--resume`` continues a stopped run and ``torchrun`` shards the images over processes.
Tables (``benchmarks.tables``) go to ``OUT/results.md`` and ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from benchmarks import folder, shards, tables
from benchmarks.faithfulness import ATTENTION, GRADIENT, ZeroShot, _nanmean, _options
from benchmarks.method_sets import RULES
from benchmarks.protocols import Protocol
from libragrad_fx import Explainer, LibraWarning, explain, libra_transform
from libragrad_fx.compiler.rules import libra
from libragrad_fx.loading.models import LoadedModel, load
from libragrad_fx.metrics import average_precision, completeness_gap, token_removal

ABLATION_METHOD = "fullgrad+"
BUILD = Path(__file__).resolve().parents[1] / "build" / "faithfulness"


def classifier(loaded: LoadedModel, classes: list[str], prompt: str) -> nn.Module:
    """What is explained: the model, or for a CLIP model its zero-shot classifier."""
    if not loaded.has_text:
        return loaded.model
    tokenizer = loaded.tokenizer
    if tokenizer is None:  # open_clip's default tokenizer at the model's own context length
        import open_clip

        length = getattr(loaded.model, "context_length", 77)

        def tokenizer(texts: list[str]) -> Tensor:
            return open_clip.tokenize(texts, context_length=length)
    return ZeroShot(loaded.model, tokenizer([prompt.format(c) for c in classes]))


def jobs(methods: Iterable[str], ablation: bool) -> list[tuple[str, str]]:
    """(method, form) pairs: attention-only methods once, gradient methods in both forms, and
    with ``ablation`` FullGrad+ with each rule off in turn (form ``"no-RULE"``)."""
    out = []
    for method in methods:
        out += [(method, "vanilla")] + ([(method, "libra")] if method in GRADIENT else [])
    if ablation:
        out += [(ABLATION_METHOD, f"no-{rule}") for rule in RULES]
    return out


class Runner:
    """One model under one protocol: explains each batch for every job and stores the rows.
    A form with a rule off (``no-RULE``) is compiled once, at the first batch, and used as it
    is afterwards (as ``explain`` uses any compiled module)."""

    def __init__(self, model: nn.Module, protocol: Protocol, quick: bool):
        self.model, self.protocol, self.quick = model, protocol, quick
        self.explainer = Explainer(model)
        self.ablated: dict[str, nn.Module] = {}

    def _explained(self, method: str, form: str, x: Tensor, target: Tensor):
        options = _options(method, self.quick)
        if method in ATTENTION:
            compiled = self.explainer.any_compiled(x)
            if all(site is None for site in compiled.structure.attention):
                return None  # nothing to read: the model has no attention
            if compiled.layout(x).cls is None:
                options["query"] = "mean"
        if form.startswith("no-"):
            return explain(self.ablated[form], x, target=target, method=method, **options)
        return explain(self.explainer, x, target=target, method=method,
                       libra=form == "libra", **options)

    def compile(self, form: str, x: Tensor) -> None:
        """Compile ``form`` before it is timed, so seconds per image leave compilation out."""
        if not form.startswith("no-"):
            self.explainer.compiled(form == "libra", x)
        elif form not in self.ablated:
            rules = libra(**{form[3:]: False})
            with warnings.catch_warnings():  # with a rule off, incomplete is expected
                warnings.simplefilter("ignore", LibraWarning)
                self.ablated[form] = libra_transform(self.model, rules=rules,
                                                     example_inputs=(x,))

    def rows(self, batch: folder.Batch, method: str, form: str) -> list[dict]:
        """One row per image: the curves' areas, completeness, AP and seconds per image."""
        x, protocol = batch.x, self.protocol
        with torch.no_grad():
            predicted = self.model(x).argmax(-1)
        target = predicted if protocol.label == "predicted" else batch.labels
        self.compile(form, x)
        start = time.perf_counter()
        e = self._explained(method, form, x, target)
        seconds = (time.perf_counter() - start) / x.shape[0]
        if e is None:
            return [{"image": n, "method": method, "form": form, "skipped": "no attention"}
                    for n in batch.names]
        curves = token_removal(self.explainer, x, e, target, mode=protocol.mode,
                               fractions=protocol.fractions, fill=protocol.fill_for(x),
                               score=protocol.score, seed=protocol.seed,
                               internal_batch_size=256)
        columns = {"srg": curves.srg_probability, "mif": curves.mif_probability_area,
                   "lif": curves.lif_probability_area, "srg_accuracy": curves.srg_accuracy,
                   "mif_accuracy": curves.mif_accuracy_area,
                   "lif_accuracy": curves.lif_accuracy_area, "completeness": completeness_gap(e)}
        if batch.masks is not None:
            columns["ap"] = average_precision(e.heatmap(tuple(x.shape[-2:])), batch.masks)
        return [{"image": name, "method": method, "form": form, "seconds": seconds,
                 "label": int(batch.labels[i]), "predicted": int(predicted[i]),
                 **{k: float(v[i]) for k, v in columns.items()}}
                for i, name in enumerate(batch.names)]


def _done(out: Path) -> set[tuple[str, str, str]]:
    done = set()
    for path in sorted(out.glob("rows-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done.add((row["image"], row["method"], row["form"]))
    return done


def run_model(loaded: LoadedModel, args, protocol: Protocol, chosen: list[folder.Entry],
              classes: list[str], out: Path) -> None:
    """Measure every job on this process's share of ``chosen``, appending to its rows file."""
    rank, size = shards.world()
    out.mkdir(parents=True, exist_ok=True)
    done = _done(out) if args.resume else set()
    if not args.resume:
        for stale in out.glob("rows-*.jsonl"):
            if rank == 0:
                stale.unlink()
    shards.barrier()
    runner = Runner(classifier(loaded, classes, args.prompt), protocol, args.quick)
    mine = chosen[rank::size]
    todo = jobs(args.methods, args.ablation)
    total = len(todo) * math.ceil(len(mine) / args.batch)
    bar = tqdm(total=total, desc=f"{loaded.name} (rank {rank})", disable=rank != 0,
               file=sys.stderr, mininterval=1 if sys.stderr.isatty() else 30)
    with (out / f"rows-{rank}.jsonl").open("a") as sink:
        for batch in folder.batches(mine, loaded.preprocessing, loaded.name, args.batch):
            for method, form in todo:
                bar.update(1)
                if all((n, method, form) in done for n in batch.names):
                    continue
                for row in runner.rows(batch, method, form):
                    if (row["image"], method, form) not in done:
                        sink.write(json.dumps(row) + "\n")
                sink.flush()
    bar.close()
    shards.barrier()


def summarise(out: Path) -> dict:
    """{method: {form: {metric: mean, "images": n}}} over every rows file of ``out``."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(out.glob("rows-*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            cells.setdefault((row["method"], row["form"]), []).append(row)
    result: dict = {}
    for (method, form), rows in cells.items():
        slot = result.setdefault(method, {})
        if "skipped" in rows[0]:
            slot[form] = None
            continue
        metrics = [k for k, v in rows[0].items() if isinstance(v, float)]
        slot[form] = {k: _nanmean([r[k] for r in rows]) for k in metrics}
        slot[form]["images"] = len(rows)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--data`` options of ``python -m benchmarks.faithfulness``."""
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
    real.add_argument("--out-dir", type=Path, default=BUILD)
    real.add_argument("--resume", action="store_true",
                      help="keep the rows already in --out-dir and measure only the rest")


def main(args) -> None:
    """The ``--data`` path of ``python -m benchmarks.faithfulness``."""
    from benchmarks.protocols import protocol as preset

    protocol = preset(args.protocol)
    if args.seed is not None:
        protocol = type(protocol)(**{**protocol.__dict__, "seed": args.seed})
    shards.init_from_env()
    rank, size = shards.world()
    chosen = folder.entries(args.data, list_file=args.list, masks=args.masks, split=args.split,
                            classes_file=args.classes)
    count = min(args.images or protocol.images, len(chosen))
    chosen = sorted(random.Random(protocol.seed).sample(chosen, count), key=lambda e: e.name)
    listed_only = args.list is not None and args.classes is None  # no names: the indices
    classes = ([str(i) for i in range(1 + max(e.label for e in chosen))] if listed_only
               else folder.class_names(args.data, args.classes))
    args.methods = args.methods or list(tables.DEFAULT_METHODS)
    out_dir = Path(args.out_dir)
    start = time.perf_counter()
    results = {}
    for spec in args.model:
        loaded = load(spec, checkpoint=args.checkpoint, pretrained=args.pretrained)
        if loaded.random_weights and rank == 0:
            print(f"benchmarks.faithfulness: note: {spec} has random weights (no --pretrained "
                  "or --checkpoint): the numbers say nothing about a trained model",
                  file=sys.stderr)
        model_out = out_dir / spec.replace(":", "_").replace("/", "_")
        run_model(loaded, args, protocol, chosen, classes, model_out)
        results[spec] = summarise(model_out)
    if rank != 0:
        return
    meta = {"protocol": protocol.name, "summary": protocol.summary, "images": count,
            "data": str(args.data), "split": args.split, "processes": size,
            "seconds": time.perf_counter() - start, "models": list(args.model)}
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "results": results},
                                                     indent=1))
    text = tables.report(results, meta)
    (out_dir / "results.md").write_text(text)
    print(text)
