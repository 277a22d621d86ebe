"""The `quantfx` command line (also `python -m quantfx`). Subcommands: `demo` (the whole
pipeline on real data)."""

from __future__ import annotations

import argparse
import sys

from quantfx import demo
from quantfx.errors import QuantFxError


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
    return parser


COMMANDS = {"demo": demo.run_from_arguments}
"""Subcommand -> function of the parsed arguments returning the exit status."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `quantfx` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except QuantFxError as error:
        print(f"quantfx {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
