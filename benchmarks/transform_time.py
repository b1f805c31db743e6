"""Time libra_transform (trace + canonicalise + rules + audit) on timm models.

    python -m benchmarks.transform_time [MODEL ...] [--repeat N]

Random weights; prints the median and the minimum over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm

from libragrad_fx import libra_transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="*", default=["vit_base_patch16_224"])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            gm = libra_transform(model)
            times.append(time.perf_counter() - start)
        print(f"{name}: median {statistics.median(times):.3f} s, min {min(times):.3f} s "
              f"over {args.repeat} runs; {gm.libra_report.counts}")


if __name__ == "__main__":
    main()
