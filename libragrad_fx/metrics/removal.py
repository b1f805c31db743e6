"""Faithfulness by token removal (DESIGN §5): MIF, LIF and their gap SRG.

Patches are ranked by attribution and removed in that order (MIF: most influential first) or
the reverse (LIF: least influential first); a faithful map makes the target's probability fall
fast under MIF and slowly under LIF. Removal happens where the model sees tokens, on the first
block's input h_0: removed patch tokens are dropped from the sequence when the rest of the graph
runs on a shorter sequence (a ViT), and zeroed otherwise (a Mixer's token-mixing MLP needs every
token). ``mode="pixel"`` instead paints the removed patches with a fill value and reruns the
whole model, which serves any image model.

Every (curve, fraction, sample) row is one row of a batch: the stream h_0 is computed once, and
only the graph's tail after h_0 runs per row, in chunks of ``internal_batch_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..attribution import Explainer, Explanation
from ..attribution.stream import TokenStream
from ..attribution.targets import resolve
from ..compiler.input_check import check_input
from ..errors import InputError, TrainingModeError
from .checks import finite_map
from .plan import Plan, ranks
from .removers import CannotDrop, PixelRemover, TokenRemover

FRACTIONS = tuple(i / 10 for i in range(10))  # 0.0, 0.1, ..., 0.9
MODES = ("auto", "drop", "zero", "pixel")


@dataclass(frozen=True)
class RemovalCurves:
    """Curves of one removal run, each (B, F) over ``fractions`` (F,), r = 0 first.

    ``*_probability`` is the target's softmax probability (for a callable or text target, the
    score it returns); ``*_accuracy`` is 1.0 where the argmax is the target class (NaN when the
    target is not a class index). ``mode`` is how patches were removed: ``"drop"``, ``"zero"``
    or ``"pixel"``; ``fallback`` says why ``mode="auto"`` could not drop, if it could not.
    Areas use the trapezoid rule over r, unnormalised (the largest possible is
    ``fractions[-1] - fractions[0]``, 0.9 by default).
    """

    fractions: Tensor
    mif_probability: Tensor
    lif_probability: Tensor
    mif_accuracy: Tensor
    lif_accuracy: Tensor
    mode: str
    removed: Tensor  # (F,) how many patches each fraction removes: round(r * patches)
    fallback: str | None = None

    def _area(self, curve: Tensor) -> Tensor:
        return torch.trapezoid(curve, self.fractions.to(curve), dim=-1)

    @property
    def mif_probability_area(self) -> Tensor:
        """(B,): lower is better."""
        return self._area(self.mif_probability)

    @property
    def lif_probability_area(self) -> Tensor:
        """(B,): higher is better."""
        return self._area(self.lif_probability)

    @property
    def srg_probability(self) -> Tensor:
        """(B,): LIF area minus MIF area, higher is better."""
        return self.lif_probability_area - self.mif_probability_area

    @property
    def mif_accuracy_area(self) -> Tensor:
        return self._area(self.mif_accuracy)

    @property
    def lif_accuracy_area(self) -> Tensor:
        return self._area(self.lif_accuracy)

    @property
    def srg_accuracy(self) -> Tensor:
        return self.lif_accuracy_area - self.mif_accuracy_area

    def mean(self) -> dict[str, float]:
        """Every area and SRG averaged over the batch (NaN rows, accuracy without class
        targets, are skipped)."""
        names = ("mif_probability_area", "lif_probability_area", "srg_probability",
                 "mif_accuracy_area", "lif_accuracy_area", "srg_accuracy")
        return {name: float(getattr(self, name).double().nanmean()) for name in names}


def token_removal(model: nn.Module | Explainer, x: Tensor, attribution: Tensor | Explanation,
                  target: object, *, mode: str = "auto",
                  fractions: Sequence[float] = FRACTIONS, fill: float | Tensor = 0.0,
                  grid: tuple[int, int] | None = None, internal_batch_size: int = 64,
                  seed: int = 0, progress: bool = False,
                  blocks: str | None = None, score: str = "probability") -> RemovalCurves:
    """MIF and LIF curves of ``attribution`` on ``model`` at ``x`` (B, C, H, W).

    ``attribution``: the patch map, (B, gh, gw) or (B, gh·gw) in raster order, or an
    ``Explanation`` (its ``patch_map``). Patches are ranked by the signed value, ties broken
    at random (``seed``) so that a flat map favours neither curve; LIF removes in exactly the
    reverse of MIF's order. A fraction r removes round(r · patches) patches; prefix tokens
    (class, registers) are never removed. ``target``: a class index or one per sample, a
    callable mapping the output to one score per sample (applied to any subset of rows), or
    what ``explain`` accepts for CLIP. ``mode``: ``"auto"`` (drop if the model runs on the
    shorter sequence with an output of the same shape, else zero), ``"drop"``, ``"zero"`` or
    ``"pixel"`` (``fill``: a number or a tensor broadcastable to x; ``grid`` is needed only
    for a flat, non-square map). ``score="logit"`` makes the ``*_probability`` curves read a
    class target's logit instead of its softmax probability (ResLRP's protocol).
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not isinstance(model, (nn.Module, Explainer)):
        raise InputError(f"token_removal needs a torch.nn.Module, got {type(model).__name__}")
    check_input(x, "token_removal", rank=4, gradients=False,
                model=model.model if isinstance(model, Explainer) else model)
    if internal_batch_size < 1:
        raise InputError("internal_batch_size must be positive")
    batch = x.shape[0]
    scores, grid = _patch_scores(attribution, batch, grid)
    patches = scores.shape[1]
    fraction = torch.as_tensor(list(fractions), dtype=torch.float64)
    if fraction.dim() != 1 or not len(fraction) or bool((fraction < 0).any()) or bool(
            (fraction >= 1).any()) or bool((fraction.diff() <= 0).any()):
        raise InputError("fractions must increase strictly, within [0, 1)")
    removed = torch.round(fraction * patches).long()
    explainer = Explainer.cached(model, blocks)
    objective = resolve(target, explainer.model, score=score)
    if objective.count is not None and objective.count != batch:
        raise InputError(f"{objective.count} targets for a batch of {batch} images; pass one "
                         "target, or one per image")
    rank = ranks(scores.to(x.device), seed)
    plan = Plan(rank, removed.to(x.device), objective, internal_batch_size, progress)
    fallback = None
    if mode == "pixel":
        tower = explainer.tower
        if any(m.training for m in tower.modules()):
            raise TrainingModeError("the model is in training mode; call model.eval() first")
        remover = PixelRemover(tower, x, grid, patches, fill)
        result = plan.evaluate(remover, split=False, desc="pixel")
        used = "pixel"
    else:
        remover = TokenRemover(TokenStream(explainer.any_compiled(x), x), x, grid, patches,
                               internal_batch_size)
        result, used = None, mode
        if mode in ("auto", "drop"):
            try:
                result, used = plan.evaluate(remover.dropping, split=True, desc="drop"), "drop"
            except CannotDrop as exc:
                if mode == "drop":
                    raise InputError(f"cannot drop tokens from this model: {exc}") from exc
                fallback = str(exc)
        if result is None:
            result, used = plan.evaluate(remover.zeroing, split=False, desc="zero"), "zero"
    probability, accuracy = result
    return RemovalCurves(fraction, probability[0], probability[1], accuracy[0], accuracy[1],
                         used, removed, fallback)


def _patch_scores(attribution: Tensor | Explanation, batch: int,
                  grid: tuple[int, int] | None) -> tuple[Tensor, tuple[int, int] | None]:
    """(B, P) scores and the patch grid, where the map's shape says it."""
    if isinstance(attribution, Explanation):
        attribution = attribution.patch_map
    if not isinstance(attribution, Tensor) or attribution.dim() not in (2, 3):
        raise InputError("attribution must be a patch map, (B, gh, gw) or (B, gh*gw), or an "
                         "Explanation")
    if attribution.shape[0] != batch:
        raise InputError(f"{attribution.shape[0]} maps for a batch of {batch} images")
    if attribution.dim() == 3:
        shape = tuple(attribution.shape[1:])
        if grid is not None and tuple(grid) != shape:
            raise InputError(f"grid={grid} does not match the map's {shape}")
        grid = shape
    scores = finite_map(attribution.detach().flatten(1).float(), "token_removal")
    if grid is not None and grid[0] * grid[1] != scores.shape[1]:
        raise InputError(f"a {grid[0]}x{grid[1]} grid does not hold {scores.shape[1]} patches")
    return scores, grid
