"""Where a forward and backward spend their time, vanilla against Libra, op by op.

    python -m benchmarks.profile_backward [MODEL] [--batch N] [--threads N] [--rows N]

Random weights; both forms compiled by libra_transform (the vanilla one with no rules), one
warm-up pass each, then torch.profiler over one input x gradient pass. docs/speed-notes.md
reads this table.
"""

from __future__ import annotations

import argparse
import warnings

import timm
import torch
from torch.profiler import profile

from libragrad_fx import LibraWarning, libra_transform


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=14, help="ops per table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, pretrained=False).eval()
    with warnings.catch_warnings():  # with no rules the graph is, as expected, not complete
        warnings.simplefilter("ignore", LibraWarning)
        forms = {"vanilla": libra_transform(model, rules=()), "libra": libra_transform(model)}
    x = torch.randn(args.batch, 3, *model.pretrained_cfg["input_size"][1:])

    def step(gm: torch.nn.Module) -> None:
        leaf = x.clone().requires_grad_(True)
        torch.autograd.grad(gm(leaf)[:, 3].sum(), leaf)

    for gm in forms.values():
        step(gm)
    for name, gm in forms.items():
        with profile() as prof:
            step(gm)
        print(f"===== {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
