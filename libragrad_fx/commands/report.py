"""``libragrad-fx report MODEL``: the rewrite report of a model, as a table or JSON."""

from __future__ import annotations

import argparse
import warnings

from ..errors import LibraWarning


def run(args: argparse.Namespace) -> None:
    """Print the report; the weights are loaded when asked for, though it does not need them."""
    import torch

    from ..compiler.transform import libra_transform
    from ..loading.models import example_input, load_model
    from .explain import input_size

    size = input_size(args.size)
    model = load_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)
    x = example_input(model) if size is None else torch.randn(1, 3, *size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LibraWarning)  # the report lists what was left
        gm = libra_transform(model, strict=args.strict, frontend=args.frontend,
                             example_inputs=None if x is None else (x,))
    report = gm.libra_report
    print(report.to_json() if args.json else report)
