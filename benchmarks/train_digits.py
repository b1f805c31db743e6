"""Train the four digits models of ``libragrad_fx.digits`` and ship their weights.

    python -m benchmarks.train_digits [--only NAME] [--epochs N] [--quick]

Each epoch pastes the train-split source digits at fresh random positions; the epoch with the
best validation accuracy is kept, its test accuracy is reported, and the weights go to
``libragrad_fx/digits/weights/NAME.safetensors`` with a row in ``metrics.json``. The classifiers
minimise cross-entropy; CLIP a symmetric contrastive loss against the ten captions, scored
zero-shot. ``--quick`` runs a few batches of each model and writes nothing (a smoke test).
Two CPU threads: the machine this was written on has two cores shared with others.
"""

from __future__ import annotations

import os

# With another process on the same two cores, OpenMP threads that spin while they wait make a
# training step ten times slower; sleeping waits cost little when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from libragrad_fx.digits import CAPTIONS, NAMES, build, make_digits, tokenize_captions
from libragrad_fx.digits.models import WEIGHTS_DIR, class_logits, save

# Per model: epochs, peak learning rate. Everything else is shared.
DEFAULTS = {"vit": (60, 1.5e-3), "mixer": (60, 1.5e-3), "eva": (60, 1.5e-3),
            "clip": (40, 1.5e-3)}
PER_EPOCH = 8192
BATCH = 64  # small data: more updates per CPU-second beat bigger batches
WEIGHT_DECAY = 0.05
N_VAL = 1000
N_TEST = 2000


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norms, embeddings and tokens are not shrunk (CLIP's unused
    token rows then stay at their seeded initialisation, which is what keeps its file small)."""
    decay, keep = [], []
    for name, param in model.named_parameters():
        if param.ndim < 2 or "embed" in name or "token" in name:
            keep.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def _clip_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               tokens: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where a batch repeats classes: images against the ten captions, and
    each caption present against all images, every image of its class a positive."""
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(tokens, normalize=True)
    logits = model.logit_scale.exp() * img @ txt.T  # (B, 10)
    image_loss = F.cross_entropy(logits, labels)
    present = labels.unique()
    per_text = logits.T[present]  # (U, B)
    positive = labels[None, :] == present[:, None]
    text_loss = (torch.logsumexp(per_text, 1)
                 - torch.logsumexp(per_text.masked_fill(~positive, -math.inf), 1)).mean()
    return (image_loss + text_loss) / 2


def augment(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random small affine warp of each canvas about its digit's centre: rotation up to ±12°,
    scale 0.85–1.1, shear up to ±0.15. A thousand source digits are too few for a ViT trained
    from scratch to generalise; warped copies close most of the gap. Train-time only: the
    evaluation canvases and their masks stay exact."""
    n, _, h, w = images.shape
    rand = torch.rand(n, 3, generator=gen) * 2 - 1
    angle = rand[:, 0] * math.radians(12)
    scale = 1.0 / (0.975 + rand[:, 1] * 0.125)  # inverse map: output pixel → input pixel
    shear = rand[:, 2] * 0.15
    cos, sin = angle.cos() * scale, angle.sin() * scale
    a = torch.stack([torch.stack([cos, -sin + shear], 1), torch.stack([sin, cos], 1)], 1)
    # The digit's centre in grid_sample's normalised (x, y) coordinates.
    ys = torch.arange(h, dtype=torch.float32)
    xs = torch.arange(w, dtype=torch.float32)
    area = masks.sum((1, 2)).clamp(min=1)
    cy = (masks.sum(2) * ys).sum(1) / area
    cx = (masks.sum(1) * xs).sum(1) / area
    centre = torch.stack([(2 * cx + 1) / w - 1, (2 * cy + 1) / h - 1], 1)
    shift = centre - (a @ centre[:, :, None])[:, :, 0]
    theta = torch.cat([a, shift[:, :, None]], 2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy; zero-shot against the captions for CLIP."""
    model.eval()
    return (class_logits(model, images).argmax(1) == labels).float().mean().item()


def train(name: str, *, epochs: int, lr: float, per_epoch: int = PER_EPOCH, batch: int = BATCH,
          n_val: int = N_VAL, n_test: int = N_TEST, max_batches: int | None = None,
          seed: int = 0, label_smoothing: float = 0.1, warp: bool = True) -> tuple[nn.Module, dict]:
    """Train ``name`` from scratch; return the best-on-validation model and its metrics."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = build(name)
    is_clip = name == "clip"
    tokens = tokenize_captions() if is_clip else None
    steps_per_epoch = per_epoch // batch
    if max_batches is not None:
        steps_per_epoch = min(steps_per_epoch, max_batches)
    total = epochs * steps_per_epoch
    warmup = min(steps_per_epoch, total // 10 + 1)
    opt = torch.optim.AdamW(_param_groups(model, WEIGHT_DECAY), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
    val = make_digits("val", n_val, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    best_acc, best_state, best_epoch = -1.0, None, 0
    text = [p for n, p in model.named_parameters()
            if is_clip and not n.startswith("visual.") and n != "logit_scale"]
    for epoch in range(epochs):
        # Trained jointly from the start, the two towers collapse to one embedding for every
        # caption (loss stuck at log 10). The first quarter trains the image tower against the
        # random captions' embeddings, distinct enough to learn from; then both move together.
        for param in text:
            param.requires_grad_(epoch >= epochs // 4)
        data = make_digits("train", steps_per_epoch * batch, seed=1000 * (seed + 1) + epoch)
        model.train()
        order = torch.randperm(len(data))
        bar = tqdm(range(steps_per_epoch), desc=f"{name} {epoch + 1}/{epochs}", leave=False)
        running = 0.0
        for step in bar:
            idx = order[step * batch:(step + 1) * batch]
            x, y = data.images[idx], data.labels[idx]
            if warp:  # half of each batch warped, half as the evaluation sees them
                chosen = torch.rand(len(idx), generator=gen) < 0.5
                x = x.clone()
                x[chosen] = augment(x[chosen], data.masks[idx][chosen], gen)
            if is_clip:
                loss = _clip_loss(model, x, y, tokens)
            else:
                loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if is_clip:
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
            running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
            bar.set_postfix(loss=f"{running:.3f}")
        acc = accuracy(model, val.images, val.labels)
        tqdm.write(f"{name} epoch {epoch + 1}/{epochs}: loss {running:.4f}, val {acc:.4f} "
                   f"({time.perf_counter() - start:.0f} s)")
        if acc > best_acc:
            best_acc, best_epoch = acc, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    test = make_digits("test", n_test, seed=seed)
    metrics = {
        "test_accuracy": round(accuracy(model, test.images, test.labels), 4),
        "val_accuracy": round(best_acc, 4),
        "metric": "zero-shot top-1 against CAPTIONS" if is_clip else "top-1",
        "n_test": n_test,
        "epochs": epochs,
        "best_epoch": best_epoch,
        "images_per_epoch": steps_per_epoch * batch,
        "lr": lr,
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if is_clip:
        metrics["zero_shot_accuracy"] = metrics["test_accuracy"]
        metrics["captions"] = list(CAPTIONS)
    return model, metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=NAMES, action="append",
                        help="train this model only (repeatable)")
    parser.add_argument("--epochs", type=int, help="override every model's epoch count")
    parser.add_argument("--quick", action="store_true",
                        help="one epoch of a few batches per model; writes nothing")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="weights folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 trains faster when another job shares the cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.only or list(NAMES)
    results = {}
    for name in names:
        epochs, lr = DEFAULTS[name]
        if args.quick:
            model, metrics = train(name, epochs=1, lr=lr, batch=16, max_batches=2, n_val=64,
                                   n_test=64, seed=args.seed)
        else:
            model, metrics = train(name, epochs=args.epochs or epochs, lr=lr, seed=args.seed)
            path = save(model, name, args.out / f"{name}.safetensors")
            metrics["weight_bytes"] = path.stat().st_size
        results[name] = metrics
        print(f"{name}: test accuracy {metrics['test_accuracy']:.4f} "
              f"(val {metrics['val_accuracy']:.4f}, best epoch {metrics['best_epoch']}), "
              f"{metrics['seconds']:.0f} s", flush=True)
    if not args.quick:
        path = args.out / "metrics.json"
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged.update(results)
        path.write_text(json.dumps({k: merged[k] for k in NAMES if k in merged}, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
