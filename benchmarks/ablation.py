"""LibraGrad's ablation on the digits models: FullGrad+ with one rule off at a time (Table 5).

Each form ``no-RULE`` compiles the model with every rule but that one (``libra(RULE=False)``)
and is measured as the other forms are, on the same single-digit canvases: SRG, MIF and LIF by
token dropping on the true label, the completeness error and AP against the digit's mask.
"""

from __future__ import annotations

import dataclasses

from benchmarks import folder, shards
from benchmarks.faithfulness import _nanmean
from benchmarks.method_sets import RULES
from benchmarks.protocols import PROTOCOLS
from benchmarks.real_data import ABLATION_METHOD, Runner
from libragrad_fx.digits import data

METRICS = ("srg", "mif", "lif", "srg_accuracy", "completeness", "ap")


def ablate(models: dict, count: int, quick: bool, batch: int = 50) -> dict:
    """{model: {"no-RULE": {metric: mean}}} for the loaded ``models`` ({name: module}), on
    rank 0 (each process measures its share of the canvases)."""
    protocol = dataclasses.replace(PROTOCOLS["libragrad"], label="true")
    index, device = shards.shard(count), shards.device()
    single = data.make_digits("test", count, seed=1)  # the canvases faithfulness.run uses
    x, labels, masks = (t[index].to(device) for t in (single.images, single.labels,
                                                       single.masks))
    out: dict = {}
    for name, model in models.items():
        runner = Runner(model, protocol, quick)
        for rule in RULES:
            rows = []
            for start in range(0, len(index), batch):
                part = slice(start, start + batch)
                names = [str(i) for i in index[part]]
                rows += runner.rows(folder.Batch(names, x[part], labels[part], masks[part]),
                                    ABLATION_METHOD, f"no-{rule}")
            gathered = shards.gather(rows, count)
            if gathered is not None:
                out.setdefault(name, {})[f"no-{rule}"] = {
                    m: _nanmean([r[m] for r in gathered]) for m in METRICS}
    return out
