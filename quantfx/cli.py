"""The `quantfx` command line (also `python -m quantfx`). Subcommands: `quantize` (a model to
ONNX + TIDL options), `doctor` (is it ready?), `analyze` (which layer loses accuracy?), `check`
(what a TIDL device runs of an exported ONNX file), `demo` (the whole pipeline on real data).

Errors are one line on stderr and exit status 2 (`--traceback` shows where they came from)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from quantfx import commands, demo
from quantfx.errors import QuantFxError
from quantfx.tidl.checker import check_tidl
from quantfx.tidl.profiles import TARGETS


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `quantfx` command (one subparser per subcommand)."""
    parser = argparse.ArgumentParser(
        prog="quantfx",
        description="torch.fx power-of-2 fixed-point quantization for TIDL-class engines.",
    )
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, print the full Python traceback too")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    formatter = argparse.ArgumentDefaultsHelpFormatter
    commands.add_quantize_arguments(subparsers.add_parser(
        "quantize", help="calibrate a float model and write ONNX, TIDL options and a report",
        description="Load MODEL, calibrate it on --calib, convert it to fixed point, export "
                    "it as QDQ ONNX verified in ONNX Runtime, and write the TIDL options file "
                    "and a short report beside it.", formatter_class=formatter))
    commands.add_doctor_arguments(subparsers.add_parser(
        "doctor", help="is the model ready to quantize? (TI's guidelines as checks; exit 1 "
                       "on a warning)",
        description="Check MODEL against TI's quantization guidelines: convs without "
                    "BatchNorm, weight outliers, depthwise layers, untraceable code, ops left "
                    "in float, unbounded activations. Exit status 1 if a finding is a "
                    "warning or an error.", formatter_class=formatter))
    commands.add_analyze_arguments(subparsers.add_parser(
        "analyze", help="which layer loses the accuracy? per-tensor SQNR and 16-bit layers",
        description="Quantize MODEL on --calib and measure every quantized tensor against "
                    "float, weights-only vs activations-only, 8 vs 16 bit, and the fewest "
                    "layers to keep at 16 bit (pass them to quantize --sixteen-bit-layers).",
        formatter_class=formatter))
    demo.add_arguments(subparsers.add_parser(
        "demo",
        help="train a small CNN, quantize it, compare float and quantized accuracy",
        description=demo.DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    ))
    check = subparsers.add_parser(
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


COMMANDS = {"quantize": commands.run_quantize, "doctor": commands.run_doctor,
            "analyze": commands.run_analyze, "check": run_check, "demo": demo.run_from_arguments}
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
    except BrokenPipeError:  # `quantfx ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"quantfx {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one readable line, not a traceback from deep inside torch
        if args.traceback:
            traceback.print_exc()
        known = isinstance(error, QuantFxError)
        message = " ".join(str(error).split()) if known else f"{type(error).__name__}: {error}"
        hint = "" if known or args.traceback else " (run with --traceback for details)"
        print(f"quantfx {args.command}: error: {message}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
