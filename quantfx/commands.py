"""The `quantize`, `doctor` and `analyze` subcommands: their options and what they run.

Each takes a MODEL (a torchvision name, `package.module:factory` or `file.py:factory`, with an
optional `--weights` state dict) and, where it needs data, `--calib` (an image folder or a
tensor file). `quantfx.cli` builds the parser and turns errors into one line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from quantfx.analysis.analyze import analyze
from quantfx.analysis.doctor import doctor
from quantfx.config import QuantConfig
from quantfx.convert import convert
from quantfx.errors import ConfigError, LoadError
from quantfx.export.onnx import export_onnx
from quantfx.files import check_destination, write_text_files
from quantfx.passes.graph_utils import flatten_values
from quantfx.ptc import calibrate, prepare
from quantfx.sources import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageOptions,
    load_calibration,
    load_model,
    parse_shape,
)
from quantfx.tidl.profiles import TARGETS

DEFAULT_SHAPE = "1,3,224,224"
"""The example input of commands given no calibration data (doctor)."""
FORMATS = ("text", "markdown", "json")
MODEL_HELP = ("a torchvision builder name (resnet18, mobilenet_v2, ...: random weights unless "
              "--weights), or package.module:factory / path/to/file.py:factory (a function or "
              "class called with no arguments that returns the float nn.Module)")


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers"
                                         ) from None


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--weights", metavar="FILE", default=None,
                        help="a state dict file (torch.save(model.state_dict(), FILE), or a "
                             "checkpoint holding one), read with weights_only=True")
    parser.add_argument("--target", choices=TARGETS, default="generic",
                        help="the device the model is for (its bias width, per-channel rules "
                             "and options file)")


def _add_data(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--calib", metavar="DIR_OR_FILE", required=required,
                        help="calibration data: a folder of images (searched recursively) or a "
                             "tensor file (.pt/.pth: a tensor (N, ...) or a list of batches; "
                             ".npy: an array (N, ...)) already scaled as the model expects")
    group = parser.add_argument_group("calibration data")
    group.add_argument("--max-images", type=positive, default=256,
                       help="calibration inputs to use, at most")
    group.add_argument("--batch-size", type=positive, default=16, help="calibration batch")
    group.add_argument("--resize", type=positive, default=256,
                       help="images: resize the shorter side to this many pixels")
    group.add_argument("--crop", type=positive, default=224,
                       help="images: then center-crop a square of this size")
    group.add_argument("--mean", type=_floats, default=IMAGENET_MEAN,
                       help="images: per-channel mean subtracted after scaling to [0, 1]")
    group.add_argument("--std", type=_floats, default=IMAGENET_STD,
                       help="images: per-channel standard deviation divided by")
    group.add_argument("--grayscale", action="store_true",
                       help="images: read as one channel instead of RGB")


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """`quantfx quantize MODEL --calib DATA -o out.onnx`."""
    _add_model(parser)
    _add_data(parser, required=True)
    parser.add_argument("-o", "--output", required=True, metavar="FILE.onnx",
                        help="the ONNX file to write; the TIDL options go to FILE.tidl.json and "
                             "a short report to FILE.report.md")
    parser.add_argument("--bits", type=int, choices=(8, 16), default=8,
                        help="activation and weight bits")
    parser.add_argument("--sixteen-bit-layers", default="", metavar="NAMES",
                        help="comma-separated layers kept at 16 bit (as `quantfx analyze` "
                             "suggests; 'first', 'last' and 'heads' work too)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip running the file in ONNX Runtime against PyTorch")
    parser.add_argument("--strict-tidl", action="store_true",
                        help="fail if a node would fall back from the accelerator to ARM")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    """`quantfx doctor MODEL`."""
    _add_model(parser)
    parser.add_argument("--input-shape", default=DEFAULT_SHAPE, metavar="SHAPE",
                        help="the example input's shape, batch first")
    parser.add_argument("--format", choices=FORMATS, default="text", help="how to print")


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """`quantfx analyze MODEL --calib DATA`."""
    _add_model(parser)
    _add_data(parser, required=True)
    parser.add_argument("--target-db", type=float, default=None, metavar="DB",
                        help="output SQNR to reach with 16-bit layers (default: 6 dB above the "
                             "8-bit model's, at most 3 dB below the all-16-bit model's)")
    parser.add_argument("-o", "--output", default=None, metavar="FOLDER",
                        help="write report.md, report.html, report.json and charts here")
    parser.add_argument("--format", choices=FORMATS, default="text", help="how to print")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _config(args: argparse.Namespace, **overrides: object) -> QuantConfig:
    return QuantConfig(target=args.target, progress=not getattr(args, "no_progress", False),
                       **overrides)


def _batches(args: argparse.Namespace) -> list[torch.Tensor]:
    images = ImageOptions(args.resize, args.crop, args.mean, args.std, args.grayscale)
    batches = load_calibration(args.calib, args.max_images, args.batch_size, images,
                               progress=not args.no_progress)
    if not batches:
        raise LoadError(f"{args.calib!r} holds no calibration inputs.")
    return batches


def _report_lines(args: argparse.Namespace, batches: list[torch.Tensor], sqnr: float,
                  seconds: float, export_summary: str) -> list[str]:
    count = sum(len(batch) for batch in batches)
    return [f"# quantfx quantize: {args.model}", "",
            f"- weights: {args.weights or 'random (no --weights given)'}",
            f"- calibration: {count} inputs of shape {tuple(batches[0].shape[1:])} from "
            f"{args.calib}",
            f"- target: {args.target}, {args.bits} bit, 16-bit layers: "
            f"{args.sixteen_bit_layers or 'none'}",
            f"- output SQNR against float on the calibration data: {sqnr:.2f} dB",
            f"- time: {seconds:.1f} s", "", "```", export_summary, "```", ""]


def run_quantize(args: argparse.Namespace) -> int:
    """Load, calibrate, convert, export (ONNX + TIDL options + report); 0 on success."""
    start = time.perf_counter()
    output = os.fspath(args.output)
    if not output.endswith(".onnx"):
        raise ConfigError(f"the output {output!r} must end with .onnx.")
    check_destination(output, "ONNX")
    report_path = os.path.splitext(output)[0] + ".report.md"
    layers = tuple(name.strip() for name in args.sixteen_bit_layers.split(",") if name.strip())
    config = _config(args, activation_bits=args.bits, weight_bits=args.bits,
                     sixteen_bit_layers=layers)
    model = load_model(args.model, args.weights)
    batches = _batches(args)
    example = batches[0][:1]
    prepared = prepare(model, example, config)
    calibrate(prepared, batches)
    converted = convert(prepared)
    sqnr = _output_sqnr(model, converted, batches[:4])
    export = export_onnx(converted, example, output, verify=not args.no_verify,
                         verify_data=batches[1:3], strict_tidl=args.strict_tidl)
    lines = _report_lines(args, batches, sqnr, time.perf_counter() - start, export.summary())
    write_text_files({report_path: "\n".join(lines)})
    print("\n".join(line for line in lines[2:] if line and line != "```"))
    print(f"wrote {export.path}, {export.options_path} and {report_path}")
    return 0


def _outputs(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([value.double().flatten() for batch in batches
                          for value in flatten_values(model(batch))
                          if isinstance(value, torch.Tensor)])


def _output_sqnr(model: torch.nn.Module, converted: torch.nn.Module,
                 batches: list[torch.Tensor]) -> float:
    """SQNR in dB of the converted model's outputs against the float model's."""
    reference = _outputs(model, batches)
    noise = float((_outputs(converted, batches) - reference).pow(2).sum())
    signal = float(reference.pow(2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def run_doctor(args: argparse.Namespace) -> int:
    """Print doctor's findings; 1 if any is a warning or an error."""
    model = load_model(args.model, args.weights)
    example = torch.randn(parse_shape(args.input_shape))
    report = doctor(model, example, config=_config(args))
    print(_formatted(report, args.format))
    return 0 if report.ok else 1


def run_analyze(args: argparse.Namespace) -> int:
    """Print analyze's report (and write it to `--output`); 0 on success."""
    model = load_model(args.model, args.weights)
    batches = _batches(args)
    report = analyze(model, batches[0][:1], batches, config=_config(args), target=args.target_db)
    print(_formatted(report, args.format))
    if args.output is not None:
        written = report.save(args.output)
        print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 0


def _formatted(report: object, form: str) -> str:
    if form == "markdown":
        return report.to_markdown()
    if form == "json":
        return report.to_json()
    return str(report)
