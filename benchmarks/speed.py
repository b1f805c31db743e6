"""Time and peak memory of LibraGrad against vanilla, Captum and LXT, side by side in one process.

    python -m benchmarks.speed [--quick] [--repeats N] [--ig-repeats N] [--out PATH] [--json PATH]

Three groups, each on random weights and one batch, every contender warmed up first (which
compiles our forms) and then timed in turns, the order rotated each round, so that drift on a
shared machine lands on all of them alike; the table gives medians. Group 1, timm ViT-B/16:
input_x_gradient, fullgrad+ in both forms, Captum's InputXGradient and a no-grad forward for
scale. Group 2: integrated gradients (50 steps, chunks of 16 rows) in both forms and Captum's.
Group 3, torchvision's ViT-B/16: ours against LXT's efficient CP-LRP (AttnLRP outside attention,
no gradient through q and k), whose patches swap class methods of torch.nn and so are switched on
only around its own calls. Peak memory is the rise of the resident set over the call, read from
/proc after resetting its high-water mark (Linux). Writes docs/speed.md by default.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from libragrad_fx import Explainer, LibraWarning, libra_transform

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(timm="vit_base_patch16_224", batch=8, steps=50, repeats=5, ig_repeats=1,
            torchvision=dict(image_size=224, patch_size=16, num_layers=12, num_heads=12,
                             hidden_dim=768, mlp_dim=3072))
QUICK = dict(timm="vit_tiny_patch16_224", batch=2, steps=4, repeats=2, ig_repeats=1,
             torchvision=dict(image_size=224, patch_size=16, num_layers=2, num_heads=2,
                              hidden_dim=64, mlp_dim=128))
CHUNK = 16  # rows per integrated-gradients chunk, ours and Captum's


# ------------------------------------------------------------------ memory


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> float | None:
    """Return memory to the system and reset the high-water mark; the resident MiB, or None
    where /proc cannot do it (not Linux)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return _status_mib("VmRSS")
    except OSError:
        return None


def timed(call: Callable[[], object]) -> tuple[float, float | None]:
    """Seconds of one call, and its peak rise of resident memory in MiB."""
    start_rss = _reset_peak()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    peak = None if start_rss is None else _status_mib("VmHWM") - start_rss
    return seconds, peak


# ------------------------------------------------------------------ contenders


@dataclass
class Contender:
    name: str
    call: Callable[[], Tensor]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    seconds: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)

    def run(self) -> None:
        with self.context():
            seconds, peak = timed(self.call)
        self.seconds.append(seconds)
        if peak is not None:
            self.peaks.append(peak)

    def row(self) -> dict:
        return {"name": self.name, "seconds": statistics.median(self.seconds),
                "runs": len(self.seconds),
                "peak_mib": statistics.median(self.peaks) if self.peaks else None}


def alternate(contenders: list[Contender], repeats: int, desc: str,
              warm: bool = True) -> list[dict]:
    """Warm every contender up (unless the calls of an earlier group already did: a long
    call's first run is not its compile), then time them in turns, rotating the order."""
    for contender in tqdm(contenders if warm else [], desc=f"{desc}: warm-up", leave=False):
        with contender.context():
            contender.call()
    bar = tqdm(total=repeats * len(contenders), desc=desc, leave=False)
    for round_ in range(repeats):
        shift = round_ % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            bar.set_postfix_str(contender.name)
            contender.run()
            bar.update()
    bar.close()
    return [c.row() for c in contenders]


def _ours(explainer: Explainer, x: Tensor, target: Tensor, method: str, libra: bool,
          **options) -> Callable[[], Tensor]:
    level = "token" if method == "fullgrad+" else "pixel"  # Captum's maps are per pixel
    return lambda: explainer.explain(x, target=target, method=method, libra=libra, level=level,
                                     **options).token_map


def _captum_ixg(model: nn.Module, x: Tensor, target: Tensor) -> Callable[[], Tensor]:
    from captum.attr import InputXGradient

    method = InputXGradient(model)
    return lambda: method.attribute(x.clone().requires_grad_(True), target=target)


def _captum_ig(model: nn.Module, x: Tensor, target: Tensor, steps: int) -> Callable[[], Tensor]:
    from captum.attr import IntegratedGradients

    method = IntegratedGradients(model)
    return lambda: method.attribute(x, baselines=torch.zeros_like(x), target=target,
                                    n_steps=steps, method="gausslegendre",
                                    internal_batch_size=CHUNK)


def _forward(model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    def call() -> Tensor:
        with torch.no_grad():
            return model(x)
    return call


def _lxt_switch() -> Callable[[], contextlib.AbstractContextManager]:
    """A context that turns LXT's CP-LRP patches of torchvision's ViT on, and off after."""
    from lxt.efficient import monkey_patch
    from lxt.efficient.models.vit_torch import cp_LRP
    from torchvision.models import vision_transformer

    classes = list(cp_LRP)
    originals = {cls: cls.__dict__["forward"] for cls in classes}
    monkey_patch(vision_transformer, cp_LRP)
    patched = {cls: cls.__dict__["forward"] for cls in classes}
    for cls, forward in originals.items():
        cls.forward = forward

    @contextlib.contextmanager
    def switched() -> Iterator[None]:
        for cls, forward in patched.items():
            cls.forward = forward
        try:
            yield
        finally:
            for cls, forward in originals.items():
                cls.forward = forward
    return switched


def _lxt_ixg(model: nn.Module, x: Tensor, target: Tensor) -> Callable[[], Tensor]:
    """LXT's recipe: input × gradient of the target logits through the patched model."""
    def call() -> Tensor:
        leaf = x.clone().requires_grad_(True)
        out = model(leaf)
        out.gather(1, target[:, None]).sum().backward()
        return leaf * leaf.grad
    return call


# ------------------------------------------------------------------ the run


def _transform_seconds(model: nn.Module, rules: tuple | None, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with warnings.catch_warnings():  # with no rules, the graph is expectedly not complete
            warnings.simplefilter("ignore", LibraWarning)
            libra_transform(model) if rules is None else libra_transform(model, rules=rules)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(plan: dict) -> dict:
    import timm
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    batch, steps = plan["batch"], plan["steps"]
    x = torch.randn(batch, 3, 224, 224)
    target = torch.arange(batch) * 7 % 1000
    model = timm.create_model(plan["timm"], pretrained=False).eval()
    explainer = Explainer(model)
    meta = {"model": plan["timm"], "batch": batch, "ig_steps": steps, "ig_chunk": CHUNK,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "transform_s": _transform_seconds(model, None),
            "trace_only_s": _transform_seconds(model, ())}
    single = [
        Contender("forward, no grad", _forward(model, x)),
        Contender("input_x_gradient, vanilla", _ours(explainer, x, target, "input_x_gradient",
                                                     False)),
        Contender("input_x_gradient, Libra", _ours(explainer, x, target, "input_x_gradient",
                                                   True)),
        Contender("fullgrad+, vanilla", _ours(explainer, x, target, "fullgrad+", False)),
        Contender("fullgrad+, Libra", _ours(explainer, x, target, "fullgrad+", True)),
        Contender("Captum InputXGradient", _captum_ixg(model, x, target)),
    ]
    ig = {"steps": steps, "internal_batch_size": CHUNK}
    multi = [
        Contender("integrated_gradients, vanilla",
                  _ours(explainer, x, target, "integrated_gradients", False, **ig)),
        Contender("integrated_gradients, Libra",
                  _ours(explainer, x, target, "integrated_gradients", True, **ig)),
        Contender("Captum IntegratedGradients", _captum_ig(model, x, target, steps)),
    ]
    tv_model = VisionTransformer(**plan["torchvision"]).eval()
    tv = Explainer(tv_model)
    switch = _lxt_switch()
    lxt = [
        Contender("input_x_gradient, vanilla", _ours(tv, x, target, "input_x_gradient", False)),
        Contender("input_x_gradient, Libra", _ours(tv, x, target, "input_x_gradient", True)),
        Contender("LXT CP-LRP (input × gradient)", _lxt_ixg(tv_model, x, target), switch),
    ]
    groups = {
        "single": alternate(single, plan["repeats"], "single pass"),
        # the forms are compiled by the single-pass group; a 50-step warm-up would double this
        "integrated_gradients": alternate(multi, plan["ig_repeats"], "integrated gradients",
                                          warm=False),
        "lxt": alternate(lxt, plan["repeats"], "torchvision vs LXT"),
    }
    return {"meta": meta, "groups": groups, "claims": claims(groups)}


def _seconds(rows: list[dict], name: str) -> float:
    return next(r["seconds"] for r in rows if r["name"] == name)


def claims(groups: dict) -> list[dict]:
    """The issue's three speed claims, each with its measured ratio."""
    single, lxt = groups["single"], groups["lxt"]
    base = _seconds(single, "input_x_gradient, vanilla")
    rows = [
        ("Libra input_x_gradient ≤ 1.0× vanilla input_x_gradient",
         _seconds(single, "input_x_gradient, Libra") / base, 1.0),
        ("Libra fullgrad+ ≤ 1.15× vanilla input_x_gradient",
         _seconds(single, "fullgrad+, Libra") / base, 1.15),
        ("ours (Libra input_x_gradient) ≤ 1.0× LXT CP-LRP, torchvision ViT",
         _seconds(lxt, "input_x_gradient, Libra") / _seconds(lxt, "LXT CP-LRP (input × gradient)"),
         1.0),
    ]
    return [{"claim": c, "ratio": r, "bound": b, "holds": r <= b} for c, r, b in rows]


# ------------------------------------------------------------------ the report


def _table(rows: list[dict], base: float) -> list[str]:
    lines = ["| contender | median s | × first gradient row | peak MiB |", "|---|---|---|---|"]
    for r in rows:
        peak = "—" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['name']} | {r['seconds']:.3f} | {r['seconds'] / base:.2f} | {peak} |")
    return lines


def markdown(result: dict) -> str:
    meta, groups = result["meta"], result["groups"]
    single = groups["single"]
    lines = [
        "# Speed and memory",
        "",
        f"Written by `python -m benchmarks.speed`: {meta['model']} (random weights), batch "
        f"{meta['batch']}, CPU ({meta['machine']}, {meta['threads']} threads), torch "
        f"{meta['torch']}. Every contender is warmed up, then timed in turns with the order "
        "rotated each round; medians. Ratios are to the vanilla input_x_gradient of the same "
        "table. Peak MiB: the rise of resident memory during one call.",
        "",
        "## Claims",
        "",
        "Measured as they came out; [speed-notes.md](speed-notes.md) says where the time goes "
        "and why a claim that fails does.",
        "",
        "| claim | measured | holds |",
        "|---|---|---|",
    ]
    for c in result["claims"]:
        lines.append(f"| {c['claim']} | {c['ratio']:.3f}× | {'yes' if c['holds'] else 'NO'} |")
    base = _seconds(single, "input_x_gradient, vanilla")
    lines += ["", "## Single pass", "", *_table(single, base), "",
              f"## Integrated gradients ({meta['ig_steps']} steps, chunks of "
              f"{meta['ig_chunk']} rows, Gauss-Legendre, pixel level)", "",
              *_table(groups["integrated_gradients"],
                      _seconds(groups["integrated_gradients"], "integrated_gradients, vanilla")),
              "", "## torchvision ViT-B/16: ours and LXT", "",
              "LXT 2.1's efficient CP-LRP patches (`lxt.efficient.models.vit_torch.cp_LRP`) on "
              "the same torchvision model; its attribution is input × gradient of the patched "
              "model, ours Libra input_x_gradient at pixel level.", "",
              *_table(groups["lxt"], _seconds(groups["lxt"], "input_x_gradient, vanilla")),
              "", "## Compile time", "",
              f"- `libra_transform` (trace, rules, report, certificate): "
              f"{meta['transform_s']:.2f} s (median of 3)",
              f"- the same pipeline with no rules (the vanilla form): {meta['trace_only_s']:.2f} s",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, batch 2, 4 IG steps; prints, writes only where told")
    parser.add_argument("--repeats", type=int, help="timed rounds of the single-pass groups")
    parser.add_argument("--ig-repeats", type=int, help="timed rounds of integrated gradients")
    parser.add_argument("--out", type=Path, help="markdown report (default docs/speed.md)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    try:
        import captum  # noqa: F401
        import lxt  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"benchmarks.speed compares with Captum and LXT: {err}; install them "
                         "with pip install -c constraints.txt -e '.[bench]'") from None
    plan = dict(QUICK if args.quick else FULL)
    if args.repeats:
        plan["repeats"] = args.repeats
    if args.ig_repeats:
        plan["ig_repeats"] = args.ig_repeats
    start = time.perf_counter()
    result = run(plan)
    result["meta"]["wall_s"] = time.perf_counter() - start
    text = markdown(result)
    print(text)
    out = args.out or (None if args.quick else ROOT / "docs" / "speed.md")
    if out is not None:
        out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
