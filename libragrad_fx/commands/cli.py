"""The ``libragrad-fx`` command line: report, explain, demo.

Errors the user can fix (a bad name, file, size or checkpoint) are one line on stderr and exit
code 2, never a traceback; the work itself lives in ``libragrad_fx.commands``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from ..errors import LibraError, LibraWarning

MODEL_HELP = ("digits:NAME (a shipped digits model: vit, mixer, eva, clip), a timm name, "
              "open_clip:NAME or module:attr")


def _add_picture(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("-o", "--output", default=default, metavar="FILE",
                        help="where to write the picture; PNG, JPEG, PDF or SVG by the file's "
                             "suffix (default: %(default)s)")
    parser.add_argument("--scale", choices=("panel", "row", "grid"), default="panel",
                        help="maps on their own scales (panel, the default), or one scale per "
                             "row or for the whole grid, drawn as a colorbar, so that vanilla "
                             "and Libra magnitudes compare")


def _add_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, nargs="+", metavar="N",
                        help="the input size, H W or one N for N×N: images are resized to it, "
                             "and it is the example input the export frontend runs the model "
                             "on (default: the size the model states, if it states one)")


def _add_weights(parser: argparse.ArgumentParser) -> None:
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", metavar="FILE",
                         help="a state_dict to load (.pt, .pth or .safetensors)")
    weights.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="TAG",
                         help="timm's or open_clip's pretrained weights (TAG picks one); "
                              "needs the hub or a cached copy")


def _report(args: argparse.Namespace) -> None:
    from . import report

    report.run(args)


def _explain(args: argparse.Namespace) -> None:
    from . import explain

    explain.run(args)


def _demo(args: argparse.Namespace) -> None:
    from . import demo

    demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    """The three subcommands and their options."""
    parser = argparse.ArgumentParser(prog="libragrad-fx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("report", help="print the LibraGrad rewrite report of a model")
    rep.add_argument("model", help=MODEL_HELP + " (a CLIP model's image tower)")
    _add_weights(rep)
    _add_size(rep)
    rep.add_argument("--json", action="store_true", help="print JSON for tools")
    rep.add_argument("--strict", action="store_true",
                     help="fail unless the result is certified complete")
    rep.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                     help="fx (symbolic tracing), export (torch.export), or fx then export")
    rep.set_defaults(run=_report)

    exp = sub.add_parser("explain", help="draw attribution maps of images as a picture")
    exp.add_argument("--model", required=True, help=MODEL_HELP)
    _add_weights(exp)
    exp.add_argument("--image", required=True, nargs="+", metavar="FILE",
                     help="one or more image files")
    what = exp.add_mutually_exclusive_group()
    what.add_argument("--target", type=int, action="append", metavar="N",
                      help="a class index, repeatable (default: the predicted class)")
    what.add_argument("--text", action="append", metavar="PROMPT",
                      help="a prompt for a CLIP model, repeatable")
    exp.add_argument("--method", nargs="+", default=["fullgrad+"], metavar="METHOD",
                     help="one or more methods (default: fullgrad+)")
    forms = exp.add_mutually_exclusive_group()
    forms.add_argument("--no-libra", action="store_true",
                       help="the vanilla gradient instead of LibraGrad's")
    forms.add_argument("--compare", action="store_true",
                       help="vanilla and LibraGrad maps side by side")
    exp.add_argument("--level", choices=("token", "pixel"), default="token",
                     help="maps per patch token (default) or per pixel")
    exp.add_argument("--query", choices=("cls", "mean"), default=None,
                     help="the attention methods' query row: the class token's (cls, their "
                          "default) or the mean over tokens (for models without one)")
    _add_size(exp)
    exp.add_argument("--mean", type=float, nargs=3, metavar="M",
                     help="per-channel input mean, for a model that does not state its own")
    exp.add_argument("--std", type=float, nargs=3, metavar="S",
                     help="per-channel input std, with --mean")
    _add_picture(exp, "libragrad-fx-explain.png")
    exp.set_defaults(run=_explain)

    dem = sub.add_parser("demo", help="the shipped models on the shipped two-digit image")
    _add_picture(dem, "libragrad-fx-demo.png")
    dem.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs about random weights
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            args.run(args)
        except LibraError as exc:  # the one line, without the warnings that led to it
            print(f"libragrad-fx: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
    _warn(caught)
    return 0


def _warn(caught: list[warnings.WarningMessage]) -> None:
    """LibraWarnings once each, in one line; the libraries' other warnings are not ours."""
    seen = set()
    for w in caught:
        text = " ".join(str(w.message).split())
        if issubclass(w.category, LibraWarning) and text not in seen:
            seen.add(text)
            print(f"libragrad-fx: warning: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
