"""The figures of docs/theory.md. Run from the repository root:

    python docs/figures/make_figures.py

completeness.png: FullGrad-completeness of the shipped digits ViT, vanilla against LibraGrad.
For 16 test canvases and every one of the ten class logits as the target, f(x) is plotted
against the FullGrad sum Σ x·∂f/∂x + Σ_b b·∂f/∂b measured by ``completeness_error``. A complete
gradient puts every point on the diagonal. Takes about ten seconds on one CPU core.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from libragrad_fx import completeness_error, libra_transform  # noqa: E402
from libragrad_fx.digits import load, make_digits  # noqa: E402

HERE = Path(__file__).resolve().parent
CLASSES = 10


def measure(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) and the FullGrad sum, (n, CLASSES) each, for every class logit as the target."""
    scores, sums = [], []
    for target in range(CLASSES):
        c = completeness_error(model, x, target)
        scores.append(c.score)
        sums.append(c.input_term + c.bias_term)
    return torch.stack(scores, 1), torch.stack(sums, 1)


def completeness_figure(path: Path) -> None:
    model = load("vit")
    digits = make_digits("test", 16, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped ViT must be certified complete
        libra = libra_transform(model)
    forms = {"vanilla gradient": model, "LibraGrad (libra_transform)": libra}
    measured = {name: measure(m, digits.images) for name, m in forms.items()}

    true = torch.zeros(len(digits.labels), CLASSES, dtype=torch.bool)
    true[torch.arange(len(digits.labels)), digits.labels] = True
    # The frame is the range of f(x); vanilla sums beyond it are drawn on its edge as triangles.
    scores = torch.cat([s.flatten() for s, _ in measured.values()])
    pad = 0.25 * float(scores.max() - scores.min())
    lo, hi = float(scores.min()) - pad, float(scores.max()) + pad

    fig, axes = plt.subplots(1, 2, figsize=(8.0, 4.4), sharex=True, sharey=True,
                             layout="constrained")
    for ax, (name, (score, total)) in zip(axes, measured.items(), strict=True):
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, zorder=0, label="f(x) = FullGrad sum")
        shown = total.clamp(lo, hi)
        outside = (total < lo) | (total > hi)
        for chosen, style in (
            (~true, dict(s=14, facecolors="none", edgecolors="tab:blue", lw=0.8,
                         label="other class logits")),
            (true, dict(s=18, color="tab:red", label="true class logit")),
        ):
            inside = chosen & ~outside
            ax.scatter(score[inside], shown[inside], **style)
            for edge, marker in ((chosen & (total < lo), "v"), (chosen & (total > hi), "^")):
                if edge.any():
                    ax.scatter(score[edge], shown[edge], marker=marker, clip_on=False,
                               **{k: v for k, v in style.items() if k != "label"})
        rel = ((score - total).abs() / score.abs().clamp_min(1e-12)).median()
        beyond = (f"\n{int(outside.sum())} sums beyond the frame, drawn on its edge (▲ ▼)"
                  if outside.any() else "\nevery point on the diagonal")
        ax.set_title(f"{name}\nmedian |f − sum| / |f| = {rel:.1e}{beyond}", fontsize=9)
        ax.set_xlabel("f(x): the target logit")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Σ x·∂f/∂x + Σ_b b·∂f/∂b")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("FullGrad-completeness of the shipped digits ViT (16 test canvases × 10 targets)",
                 fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    print(f"wrote {path}")
    for name, (score, total) in measured.items():
        rel = (score - total).abs() / score.abs().clamp_min(1e-12)
        print(f"  {name}: relative error median {rel.median():.2e}, max {rel.max():.2e}")


if __name__ == "__main__":
    torch.manual_seed(0)
    completeness_figure(HERE / "completeness.png")
