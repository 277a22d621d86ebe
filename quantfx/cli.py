"""The `quantfx` command line. Subcommands: `demo` (the whole pipeline on real data)."""

from __future__ import annotations

import argparse
import sys

from quantfx.errors import QuantFxError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `quantfx` command (one subparser per subcommand)."""
    parser = argparse.ArgumentParser(
        prog="quantfx",
        description="torch.fx power-of-2 fixed-point quantization for TIDL-class engines.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train a small CNN, quantize it, compare float and quantized accuracy",
        description=(
            "Train a small CNN (conv+BN+ReLU) in float with fixed seeds, then prepare, calibrate "
            "and convert it with quantfx (plus ONNX export and QAT when this version has them), "
            "and print float vs quantized test accuracy and the time of each stage. Data: "
            "Fashion-MNIST if /usr/share/datasets/fashion-mnist exists (apt-get install "
            "dataset-fashion-mnist) or --data-dir is given, else scikit-learn's bundled 8x8 "
            "digits (no download)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument(
        "--dataset",
        choices=("auto", "digits", "fashion-mnist"),
        default="auto",
        help="data set; 'auto' picks Fashion-MNIST when available, else digits",
    )
    demo.add_argument(
        "--data-dir",
        default=None,
        help="folder with the four Fashion-MNIST IDX gz files (train-images-idx3-ubyte.gz, ...)",
    )
    demo.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="float training epochs (default: 20 on digits, 3 on Fashion-MNIST)",
    )
    demo.add_argument(
        "--qat-epochs",
        type=int,
        default=1,
        help="QAT fine-tune epochs when prepare_qat exists (0 skips QAT)",
    )
    demo.add_argument(
        "--calibration-images", type=int, default=1000, help="training images used for calibration"
    )
    demo.add_argument("--batch-size", type=int, default=64, help="training/calibration batch")
    demo.add_argument("--seed", type=int, default=0, help="seed of weights, split and order")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads, at most 2 (1 is fastest on a busy shared machine)")
    demo.add_argument("--quiet", action="store_true", help="print only the table")
    return parser


def run_demo_command(args: argparse.Namespace) -> int:
    """Run the demo with the parsed options; exit status 1 if an optional stage failed."""
    from quantfx.demo import run_demo

    result = run_demo(
        dataset=args.dataset,
        data_dir=args.data_dir,
        epochs=args.epochs,
        qat_epochs=args.qat_epochs,
        calibration_images=args.calibration_images,
        batch_size=args.batch_size,
        seed=args.seed,
        threads=args.threads,
        verbose=not args.quiet,
    )
    if args.quiet:
        print(result.table())
    return 1 if result.failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `quantfx` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            return run_demo_command(args)
    except QuantFxError as error:
        print(f"quantfx {args.command}: error: {error}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse checks
    return 2


if __name__ == "__main__":
    sys.exit(main())
