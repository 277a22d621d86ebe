"""The `quantfx` command line's options: every parser, and nothing heavier than argparse.

Kept apart from what the commands run (`quantfx.app.commands`, `quantfx.demo`) so `quantfx --help`
and a mistyped option answer without importing torch or ONNX Runtime.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn

from quantfx.tidl.profiles import TARGETS, resolve_target
from quantfx.version import __version__

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet's per-channel normalization, the default preprocessing of image folders."""
DEMO_DATASETS = ("auto", "digits", "fashion-mnist")
"""The demo's data sets ('auto': Fashion-MNIST when installed, else digits)."""
DEFAULT_SHAPE = "1,3,224,224"
"""The example input of commands given no calibration data (doctor)."""
FORMATS = ("text", "markdown", "json")
MODEL_HELP = ("a torchvision builder name (resnet18, mobilenet_v2, ...: random weights unless "
              "--weights), or package.module:factory / path/to/file.py:factory (a function or "
              "class called with no arguments that returns the float nn.Module)")
DEMO_DESCRIPTION = (
    "Train a small CNN (conv+BN+ReLU) in float with fixed seeds, then prepare, calibrate and "
    "convert it with quantfx, export it to ONNX and run it in ONNX Runtime, fine-tune it with "
    "QAT, and print float vs quantized test accuracy and the time of each stage. Data: "
    "Fashion-MNIST if /usr/share/datasets/fashion-mnist exists (apt-get install "
    "dataset-fashion-mnist) or --data-dir is given, else scikit-learn's bundled 8x8 digits "
    "(no download)."
)
DEFAULTS = argparse.ArgumentDefaultsHelpFormatter
DETECTION_KINDS = ("yolox", "yolov8")
"""The detectors `quantize --detection` exports whole (TIDL meta-architectures 6 and 8)."""


def count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum` (a bad value is a usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {minimum}")
        return value
    return parse


def floats(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated finite numbers."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers"
                                         ) from None
    if not all(math.isfinite(value) for value in values):
        raise argparse.ArgumentTypeError(f"{text!r} holds a value that is not finite")
    return values


def positive_floats(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated finite numbers above 0 (a standard deviation)."""
    values = floats(text)
    if not all(value > 0 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be above 0 (a standard "
                                         "deviation divides)")
    return values


def integers(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated positive integers."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers"
                                         ) from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be 1 or more")
    return values


def _add_detection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("detection export (TIDL's meta-architecture)")
    group.add_argument("--detection", choices=DETECTION_KINDS, default=None,
                       help="the model's outputs are a detector's head tensors (yolox: one per "
                            "stride; yolov8: per stride the class conv, then the box conv): add "
                            "decode + NMS to the file and write FILE.prototxt for TIDL")
    group.add_argument("--strides", type=integers, default=None, metavar="N,N,...",
                       help="with --detection: each level's stride, e.g. 8,16,32")
    group.add_argument("--num-classes", type=count(1), default=None, metavar="N",
                       help="with --detection: the number of classes")
    group.add_argument("--reg-max", type=count(1), default=None, metavar="N",
                       help="with --detection yolov8: DFL bins per box side (default 16)")
    group.add_argument("--confidence-threshold", type=float, default=0.3, metavar="P",
                       help="with --detection: lowest score kept (default 0.3)")
    group.add_argument("--nms-threshold", type=float, default=0.45, metavar="IOU",
                       help="with --detection: NMS overlap (default 0.45)")


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """-v / -q: how much the command says on stderr while it works."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true",
                       help="also log each step's details (e.g. every layer's measured "
                            "8-bit loss)")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="only warnings and errors on stderr: no step lines, no progress "
                            "bars (quantize: no summary either; the files are still written)")


def _add_model(parser: argparse.ArgumentParser) -> None:
    add_verbosity(parser)
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--weights", metavar="FILE", default=None,
                        help="a state dict file (torch.save(model.state_dict(), FILE), or a "
                             "checkpoint holding one), read with weights_only=True")
    parser.add_argument("--target", choices=TARGETS, default=None, type=resolve_target,
                        help="the device the model is for (its bias width, per-channel rules "
                             "and options file; default generic); TI's Jacinto names (j721e, "
                             "j721s2, ...) work too")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="QuantConfig fields from a .toml or .json file (e.g. target = "
                             "\"tda4vm\"); the flags given and --set override it")
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        metavar="FIELD=VALUE",
                        help="any QuantConfig field, e.g. --set per_channel_depthwise=false "
                             "--set weight_rounding=learned (repeatable; lists comma-separated; "
                             "true/false/none)")


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib", metavar="DIR_OR_FILE", required=True,
                        help="calibration data: a folder of images (searched recursively) or a "
                             "tensor file (.pt/.pth: a tensor (N, ...) or a list of batches; "
                             ".npy: an array (N, ...)) already scaled as the model expects")
    group = parser.add_argument_group("calibration data")
    group.add_argument("--max-images", type=count(1), default=256,
                       help="calibration inputs to use, at most")
    group.add_argument("--batch-size", type=count(1), default=16, help="calibration batch")
    group.add_argument("--resize", type=count(1), default=256,
                       help="images: resize the shorter side to this many pixels")
    group.add_argument("--crop", type=count(1), default=224,
                       help="images: then center-crop a square of this size")
    group.add_argument("--mean", type=floats, default=IMAGENET_MEAN,
                       help="images: per-channel mean subtracted after scaling to [0, 1]")
    group.add_argument("--std", type=positive_floats, default=IMAGENET_STD,
                       help="images: per-channel standard deviation divided by")
    group.add_argument("--grayscale", action="store_true",
                       help="images: read as one channel instead of RGB")


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """`quantfx quantize MODEL --calib DATA -o out.onnx`."""
    _add_model(parser)
    _add_data(parser)
    parser.add_argument("-o", "--output", required=True, metavar="FILE.onnx",
                        help="the ONNX file to write; the TIDL options go to FILE.tidl.json and "
                             "a short report to FILE.report.md")
    parser.add_argument("--bits", type=int, choices=(8, 16), default=None,
                        help="activation and weight bits")
    parser.add_argument("--sixteen-bit-layers", default="", metavar="NAMES",
                        help="comma-separated layers kept at 16 bit (as `quantfx analyze` "
                             "suggests; 'first', 'last' and 'heads' work too)")
    parser.add_argument("--distill", type=count(1), default=None, metavar="STEPS",
                        help="after calibration, train STEPS steps without labels, the float "
                             "model teaching the quantized one on the calibration data "
                             "(quantfx.distill)")
    parser.add_argument("--checkpoint", default=None, metavar="FILE",
                        help="with --distill: save progress here and resume from it")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip running the file in ONNX Runtime against PyTorch")
    parser.add_argument("--strict-tidl", action="store_true",
                        help="fail if a node would fall back from the accelerator to ARM")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_detection(parser)


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    """`quantfx doctor MODEL`."""
    _add_model(parser)
    parser.add_argument("--input-shape", default=DEFAULT_SHAPE, metavar="SHAPE",
                        help="the example input's shape, batch first")
    parser.add_argument("--format", choices=FORMATS, default="text", help="how to print")


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """`quantfx analyze MODEL --calib DATA`."""
    _add_model(parser)
    _add_data(parser)
    parser.add_argument("--target-db", type=float, default=None, metavar="DB",
                        help="output SQNR to reach with 16-bit layers (default: 6 dB above the "
                             "8-bit model's, at most 3 dB below the all-16-bit model's)")
    parser.add_argument("-o", "--output", default=None, metavar="FOLDER",
                        help="write report.md, report.html, report.json and charts here")
    parser.add_argument("--format", choices=FORMATS, default="text", help="how to print")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options (shared by `python -m quantfx.demo` and `quantfx demo`)."""
    parser.add_argument("--dataset", choices=DEMO_DATASETS, default="auto",
                        help="data set; 'auto' picks Fashion-MNIST when available, else digits")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the four Fashion-MNIST IDX gz files "
                             "(train-images-idx3-ubyte.gz, ...)")
    parser.add_argument("--epochs", type=count(1), default=None,
                        help="float training epochs (None: 20 on digits, 3 on Fashion-MNIST)")
    parser.add_argument("--qat-epochs", type=count(0), default=1,
                        help="QAT fine-tune epochs (0 skips QAT)")
    parser.add_argument("--calibration-images", type=count(1), default=1000,
                        help="training images used for calibration")
    parser.add_argument("--batch-size", type=count(1), default=64,
                        help="training/calibration batch")
    parser.add_argument("--seed", type=count(0), default=0,
                        help="seed of weights, split and order")
    parser.add_argument("--threads", type=count(1), default=1,
                        help="torch CPU threads (1 is fastest on a busy shared machine)")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    return parser


def _add_check_arguments(parser: argparse.ArgumentParser) -> None:
    add_verbosity(parser)
    parser.add_argument("file", help="the exported .onnx file")
    parser.add_argument("--target", choices=TARGETS, default=None, type=resolve_target,
                        help="the device whose rules apply (TI's Jacinto names work too; "
                             "default: the target quantfx recorded in the file, else generic)")
    parser.add_argument("--format", choices=FORMATS, default="text",
                        help="text: summary and findings; markdown: a table of every node")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 on warnings too (what TIDL would run differently from "
                             "the file: per-channel weights on tda4vm, biases past 16 bit, "
                             "...): a CI gate")


SUBCOMMANDS = {
    "quantize": (add_quantize_arguments,
                 "calibrate a float model and write ONNX, TIDL options and a report",
                 "Load MODEL, calibrate it on --calib, convert it to fixed point, export it as "
                 "QDQ ONNX verified in ONNX Runtime, and write the TIDL options file and a "
                 "short report beside it."),
    "doctor": (add_doctor_arguments,
               "is the model ready to quantize? (TI's guidelines as checks; exit 1 on a "
               "warning)",
               "Check MODEL against TI's quantization guidelines: convs without BatchNorm, "
               "weight outliers, depthwise layers, untraceable code, ops left in float, "
               "unbounded activations. Exit status 1 if a finding is a warning or an error."),
    "analyze": (add_analyze_arguments,
                "which layer loses the accuracy? per-tensor SQNR and 16-bit layers",
                "Quantize MODEL on --calib and measure every quantized tensor against float, "
                "weights-only vs activations-only, 8 vs 16 bit, and the fewest layers to keep "
                "at 16 bit (pass them to quantize --sixteen-bit-layers)."),
    "demo": (add_demo_arguments,
             "train a small CNN, quantize it, compare float and quantized accuracy",
             DEMO_DESCRIPTION),
    "check": (_add_check_arguments,
              "what a TIDL device runs of an exported ONNX file (exit 1: ARM fallback)",
              "Check an ONNX file against TIDL's operator and quantization rules for a device: "
              "every node offloaded to the accelerator or falling back to the ARM cores (and "
              "why), missing Q/DQ, bias range, per-channel rules. Exit status 0 when "
              "everything is offloaded, 1 when a node falls back."),
}
"""Subcommand -> (its options, one-line help, description)."""


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, as every other error of the command
    line is (argparse prints its whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `quantfx` command (one subparser per subcommand)."""
    parser = OneLineParser(
        prog="quantfx",
        description="torch.fx power-of-2 fixed-point quantization for TIDL-class engines.",
    )
    parser.add_argument("--version", action="version", version=f"quantfx {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, print the full Python traceback too")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.subcommands = subparsers.choices  # name -> its parser (cli reports leftovers there)
    for name, (add, summary, description) in SUBCOMMANDS.items():
        add(subparsers.add_parser(name, help=summary, description=description,
                                  formatter_class=DEFAULTS))
    return parser
