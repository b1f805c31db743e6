"""The ``libragrad-fx`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from .errors import LibraError, LibraWarning


def _report(args: argparse.Namespace) -> None:
    from .models import example_input, load_model
    from .transform import libra_transform

    model = load_model(args.model)
    x = example_input(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LibraWarning)  # the report lists what was left
        gm = libra_transform(model, strict=args.strict, frontend=args.frontend,
                             example_inputs=None if x is None else (x,))
    report = gm.libra_report
    print(report.to_json() if args.json else report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="libragrad-fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="print the LibraGrad rewrite report of a model")
    rep.add_argument("model", help="timm name, open_clip:NAME (image tower) or module:attr")
    rep.add_argument("--json", action="store_true", help="print JSON for tools")
    rep.add_argument("--strict", action="store_true",
                     help="fail unless the result is certified complete")
    rep.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                     help="fx (symbolic tracing), export (torch.export), or fx then export")
    rep.set_defaults(run=_report)
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs about random weights
    try:
        args.run(args)
    except LibraError as exc:
        print(f"libragrad-fx: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
