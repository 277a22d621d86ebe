"""The `quantfx` command line (also `python -m quantfx`). Subcommands: `demo` (the whole
pipeline on real data), `check` (what a TIDL device runs of an exported ONNX file)."""

from __future__ import annotations

import argparse
import os
import sys

from quantfx import demo
from quantfx.errors import QuantFxError
from quantfx.tidl.checker import check_tidl
from quantfx.tidl.profiles import TARGETS


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `quantfx` command (one subparser per subcommand)."""
    parser = argparse.ArgumentParser(
        prog="quantfx",
        description="torch.fx power-of-2 fixed-point quantization for TIDL-class engines.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo.add_arguments(commands.add_parser(
        "demo",
        help="train a small CNN, quantize it, compare float and quantized accuracy",
        description=demo.DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    ))
    check = commands.add_parser(
        "check", help="what a TIDL device runs of an exported ONNX file (exit 1: ARM fallback)",
        description="Check an ONNX file against TIDL's operator and quantization rules for a "
                    "device: every node offloaded to the accelerator or falling back to the "
                    "ARM cores (and why), missing Q/DQ, bias range, per-channel rules. Exit "
                    "status 0 when everything is offloaded, 1 when a node falls back.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    check.add_argument("file", help="the exported .onnx file")
    check.add_argument("--target", choices=TARGETS, default="generic",
                       help="the device whose rules apply")
    check.add_argument("--format", choices=("text", "markdown", "json"), default="text",
                       help="text: summary and findings; markdown: a table of every node")
    return parser


def run_check(args: argparse.Namespace) -> int:
    """`quantfx check FILE --target T`: print the report; 1 if a node falls back to ARM."""
    if not os.path.isfile(args.file):
        what = "is a folder" if os.path.isdir(args.file) else "does not exist"
        print(f"quantfx check: error: {args.file} {what}; give an exported .onnx file.",
              file=sys.stderr)
        return 2
    report = check_tidl(args.file, args.target)
    print({"text": str, "markdown": lambda r: r.to_markdown(),
           "json": lambda r: r.to_json()}[args.format](report))
    return 0 if report.fully_offloaded else 1


COMMANDS = {"demo": demo.run_from_arguments, "check": run_check}
"""Subcommand -> function of the parsed arguments returning the exit status."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `quantfx` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except QuantFxError as error:
        print(f"quantfx {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
