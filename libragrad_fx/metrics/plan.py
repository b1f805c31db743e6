"""The rows of a token-removal run: patches ranked by attribution, and every (curve, fraction,
sample) row evaluated in chunks, with an optional progress bar."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ..attribution.targets import Target
from ..errors import InputError


def ranks(scores: Tensor, seed: int) -> Tensor:
    """(B, P): each patch's place in descending order, 0 the most influential; ties in a
    random order (one permutation per row)."""
    generator = torch.Generator().manual_seed(seed)
    shuffle = torch.rand(scores.shape, generator=generator).argsort(1).to(scores.device)
    order = scores.gather(1, shuffle).argsort(dim=1, descending=True, stable=True)
    order = shuffle.gather(1, order)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return rank


class Plan:
    """The rows (curve, fraction, sample), their order, chunks and scores."""

    def __init__(self, rank: Tensor, removed: Tensor, objective: Target, size: int, progress: bool):
        self.rank, self.removed, self.objective, self.size = rank, removed, objective, size
        self.progress = progress
        batch, device = rank.shape[0], rank.device
        rows = []  # the most removed first: the first chunk is the test that dropping works
        for j in sorted(range(len(removed)), key=lambda i: -int(removed[i])):
            for curve in ((0,) if int(removed[j]) == 0 else (0, 1)):  # r = 0: one curve
                rows.append(torch.stack(torch.broadcast_tensors(
                    torch.tensor(curve, device=device), torch.tensor(j, device=device),
                    torch.arange(batch, device=device))))
        self.curve, self.fraction, self.sample = torch.cat(rows, 1)
        table = objective.table
        self.classes = (None if table is None or table.is_floating_point()
                        else table.to(device).expand(batch))

    def chunks(self, split: bool) -> Iterator[Tensor]:
        """Row indices, ``size`` at most; with ``split``, one fraction per chunk."""
        keys = self.fraction if split else torch.zeros_like(self.fraction)
        _, counts = torch.unique_consecutive(keys, return_counts=True)
        start = 0
        for count in counts.tolist():
            for lo in range(start, start + count, self.size):
                yield torch.arange(lo, min(lo + self.size, start + count),
                                   device=self.fraction.device)
            start += count

    def evaluate(self, run: Callable[[Tensor, Tensor], Tensor], split: bool,
                 desc: str) -> tuple[Tensor, Tensor]:
        """(2, B, F) probabilities and accuracies, LIF's r = 0 copied from MIF's."""
        batch, patches = self.rank.shape
        frames = len(self.removed)
        probability = torch.full((2, batch, frames), float("nan"), dtype=torch.float64,
                                 device=self.rank.device)
        accuracy = probability.clone()
        with _progress(len(self.sample), desc, self.progress) as bar, torch.no_grad():
            for rows in self.chunks(split):
                curve, fraction, sample = (self.curve[rows], self.fraction[rows],
                                           self.sample[rows])
                k = self.removed[fraction][:, None]
                rank = self.rank[sample]
                gone = torch.where(curve[:, None] == 0, rank < k, rank >= patches - k)
                output = run(sample, gone)
                value = self.objective.take(sample).score(output, False)
                probability[curve, sample, fraction] = value.double()
                if self.classes is not None:
                    hit = output.argmax(-1) == self.classes[sample]
                    accuracy[curve, sample, fraction] = hit.double()
                bar.update(len(rows))
        first = self.removed == 0
        probability[1][:, first] = probability[0][:, first]
        accuracy[1][:, first] = accuracy[0][:, first]
        return probability, accuracy


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        yield _NoBar()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise InputError("progress=True needs tqdm (pip install tqdm)") from exc
    with tqdm(total=total, desc=f"token removal ({desc})", unit="row") as bar:
        yield bar


class _NoBar:
    def update(self, n: int) -> None:
        pass
