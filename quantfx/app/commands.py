"""The `quantize`, `doctor` and `analyze` subcommands: their options and what they run.

Each takes a MODEL (a torchvision name, `package.module:factory` or `file.py:factory`, with an
optional `--weights` state dict) and, where it needs data, `--calib` (an image folder or a
tensor file). Their options live in `quantfx.arguments`; `quantfx.app.cli` parses them, imports
this module only then, and turns errors into one line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace

import torch

from quantfx.analysis.analyze import analyze
from quantfx.analysis.doctor import Finding, doctor
from quantfx.analysis.plots import check_report_folder
from quantfx.app.models import load_model, parse_shape
from quantfx.config import QuantConfig
from quantfx.convert import convert
from quantfx.distillation import distill
from quantfx.distillation_state import check_checkpoint_path
from quantfx.errors import ConfigError, LoadError, PrepareError
from quantfx.export.meta_arch import MetaArch, Yolov8MetaArch, YoloxMetaArch
from quantfx.export.onnx import export_onnx
from quantfx.export.report import ExportReport
from quantfx.files import check_destination, write_text_files
from quantfx.partial import quantized_parts
from quantfx.passes.graph_utils import flatten_values
from quantfx.ptc import calibrate, prepare
from quantfx.settings import settings_from_file, settings_from_text
from quantfx.sources import ImageOptions, load_calibration
from quantfx.state import state_of

LOG = logging.getLogger(__name__)


def config_from_arguments(args: argparse.Namespace, **flags: object) -> QuantConfig:
    """The fields of `--config FILE`, then the flags given (None: not given), then every
    `--set FIELD=VALUE` over them."""
    keywords = settings_from_file(args.config) if getattr(args, "config", None) else {}
    flags.update(target=args.target, progress=False if _quiet_bars(args) else None)
    keywords.update({name: value for name, value in flags.items() if value is not None})
    keywords.update(settings_from_text(getattr(args, "settings", None) or []))
    return QuantConfig(**keywords)


def _quiet_bars(args: argparse.Namespace) -> bool:
    """No progress bars: --no-progress or -q."""
    return getattr(args, "no_progress", False) or getattr(args, "quiet", False)


def _batches(args: argparse.Namespace) -> list[torch.Tensor]:
    images = ImageOptions(args.resize, args.crop, args.mean, args.std, args.grayscale)
    batches = load_calibration(args.calib, args.max_images, args.batch_size, images,
                               progress=not _quiet_bars(args))
    if not batches:
        raise LoadError(f"{args.calib!r} holds no calibration inputs.")
    return batches


def _report_lines(args: argparse.Namespace, prepared: torch.nn.Module,
                  batches: list[torch.Tensor], sqnr: float, seconds: float,
                  export_summary: str) -> list[str]:
    count = sum(len(batch) for batch in batches)
    config, measured = state_of(prepared).config, state_of(prepared).measured_sixteen_bit
    return [f"# quantfx quantize: {args.model}", "",
            f"- weights: {args.weights or 'random (no --weights given)'}",
            f"- calibration: {count} inputs of shape {tuple(batches[0].shape[1:])} from "
            f"{args.calib}",
            f"- target: {config.target}, {config.activation_bits}-bit activations, "
            f"{config.weight_bits}-bit weights, 16-bit layers: "
            f"{', '.join(config.sixteen_bit_layers) or 'none'}; by measurement: "
            f"{', '.join(measured) or 'none'}",
            f"- distill: {f'{args.distill} steps without labels' if args.distill else 'no'}",
            f"- output SQNR against float on the calibration data: {sqnr:.2f} dB",
            f"- time: {seconds:.1f} s", "", "```", export_summary, "```", ""]


def _detection(args: argparse.Namespace) -> MetaArch | None:
    """The meta-architecture `--detection` names (None without it); a ConfigError when an
    option it needs is missing or one is given without it."""
    needed = {"--strides": args.strides, "--num-classes": args.num_classes}
    if args.detection is None:
        given = [flag for flag, value in {**needed, "--reg-max": args.reg_max}.items()
                 if value is not None]
        if given:
            raise ConfigError(f"{given[0]} describes a detector's heads: give --detection "
                              "yolox or --detection yolov8 too.")
        return None
    missing = [flag for flag, value in needed.items() if value is None]
    if missing:
        raise ConfigError(f"--detection {args.detection} needs {' and '.join(missing)} (e.g. "
                          "--strides 8,16,32 --num-classes 80).")
    if args.reg_max is not None and args.detection != "yolov8":
        raise ConfigError("--reg-max is the DFL bin count of a YOLOv8 head: it goes with "
                          "--detection yolov8 only.")
    fields = dict(strides=args.strides, num_classes=args.num_classes,
                  confidence_threshold=args.confidence_threshold,
                  nms_threshold=args.nms_threshold)
    if args.detection == "yolov8":
        given = {} if args.reg_max is None else {"reg_max": args.reg_max}  # else its default
        return Yolov8MetaArch(**fields, **given)
    return YoloxMetaArch(**fields)


SAMPLE_FLAGS = "Check --grayscale, --resize and --crop (or the tensor file)"


def _in_flags(message: str, sample: str, flags: str) -> str | None:
    """A "model fails on example_inputs" message told in the command line's terms (the
    flags that made the input); None for any other message."""
    first = message.splitlines()[0]
    if "fails on example_inputs" not in first:
        return None
    return (first.replace("example_inputs", sample) +
            f". {flags} against the model's input channels and size.")


@contextlib.contextmanager
def _told_in_flags(sample: str = "the first calibration sample", flags: str = SAMPLE_FLAGS
                   ) -> Iterator[None]:
    """Re-raise a PrepareError for a model that rejects its input in the flags' terms."""
    try:
        yield
    except PrepareError as error:
        told = _in_flags(str(error), sample, flags)
        if told is None:
            raise
        raise PrepareError(told) from error


def run_quantize(args: argparse.Namespace) -> int:
    """Load, calibrate, convert, export (ONNX + TIDL options + report); 0 on success."""
    start = time.perf_counter()
    output = os.fspath(args.output)
    if not output.endswith(".onnx"):
        raise ConfigError(f"the output {output!r} must end with .onnx.")
    check_destination(output, "ONNX")
    if args.checkpoint is not None and not args.distill:
        raise ConfigError("--checkpoint saves distillation progress: give --distill STEPS too.")
    if args.checkpoint is not None:
        check_checkpoint_path(args.checkpoint)
    report_path = os.path.splitext(output)[0] + ".report.md"
    detection = _detection(args)
    layers = tuple(name.strip() for name in args.sixteen_bit_layers.split(",") if name.strip())
    config = config_from_arguments(args, activation_bits=args.bits, weight_bits=args.bits,
                     sixteen_bit_layers=layers or None)
    model = load_model(args.model, args.weights)
    LOG.info("loaded %s (%s)", args.model, args.weights or "random weights")
    batches = _batches(args)
    LOG.info("calibration data: %d inputs of shape %s", sum(len(b) for b in batches),
             tuple(batches[0].shape[1:]))
    example = batches[0][:1]
    with _told_in_flags():
        prepared = prepare(model, example, config)
    if quantized_parts(state_of(prepared)) and (detection is not None or args.distill):
        raise ConfigError(f"this model is quantized in parts (quantize_only), which export "
                          f"part by part, without {'--detection' if detection else '--distill'}"
                          ": quantize the whole model for that, or drop the option.")
    calibrate(prepared, batches)
    if args.distill:
        LOG.info("distilling %d steps", args.distill)
        converted = convert(distill(prepared, batches, steps=args.distill,
                                    checkpoint=args.checkpoint))
    else:
        converted = convert(prepared)
    sqnr = _output_sqnr(model, converted, batches[:4])
    LOG.info("exporting %s (verified in ONNX Runtime: %s)", output,
             "no" if args.no_verify else "yes")
    exports = _export(args, converted, example, batches, output, detection)
    lines = _report_lines(args, prepared, batches, sqnr, time.perf_counter() - start,
                          "\n".join(export.summary() for export in exports))
    write_text_files({report_path: "\n".join(lines)})
    if not args.quiet:
        print("\n".join(line for line in lines[2:] if line and line != "```"))
        written = [path for export in exports for path in (
            export.path, export.options_path, export.prototxt_path) if path]
        print(f"wrote {', '.join(written)} and {report_path}")
    return 0


def _export(args: argparse.Namespace, converted: torch.nn.Module, example: torch.Tensor,
            batches: list[torch.Tensor], output: str, detection: MetaArch | None
            ) -> list[ExportReport]:
    """The whole model to `output`; a partly quantized one part by part, each quantized part
    to `<output stem>.<part>.onnx` (export_onnx's `part=`): all parts are written into a
    folder beside `output` first and moved into place together, so a part that fails leaves
    every file of an earlier run as it was."""
    parts = quantized_parts(state_of(converted))
    options = dict(verify=not args.no_verify, verify_data=batches[1:3] or None,
                   strict_tidl=args.strict_tidl, detection=detection)
    if not parts:
        return [export_onnx(converted, example, output, **options)]
    folder, stem = os.path.dirname(output), os.path.splitext(os.path.basename(output))[0]
    with tempfile.TemporaryDirectory(prefix=".quantfx-parts-", dir=folder or ".") as staging:
        reports = [export_onnx(converted, example, os.path.join(staging, f"{stem}.{part}.onnx"),
                               part=part, **options) for part in parts]
        for report in reports:
            for attribute in ("path", "options_path"):  # named as the user named the output
                final = os.path.join(folder, os.path.basename(getattr(report, attribute)))
                os.replace(getattr(report, attribute), final)
                setattr(report, attribute, final)
    return reports


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
    report = doctor(model, example, config=config_from_arguments(args))
    report.findings = [_finding_in_flags(finding) for finding in report.findings]
    print(_formatted(report, args.format))
    return 0 if report.ok else 1


def _finding_in_flags(finding: Finding) -> Finding:
    """A doctor finding that says example_inputs, in the command line's terms."""
    told = _in_flags(finding.what, "the --input-shape tensor", "Check --input-shape")
    if told is None:
        return finding
    return replace(finding, what=told, fix="give --input-shape as the model's forward takes it "
                   "(N,C,H,W, e.g. 1,3,224,224)")


def run_analyze(args: argparse.Namespace) -> int:
    """Print analyze's report (and write it to `--output`); 0 on success."""
    if args.output is not None:
        check_report_folder(args.output)  # before minutes of work, not after
    model = load_model(args.model, args.weights)
    batches = _batches(args)
    with _told_in_flags():
        report = analyze(model, batches[0][:1], batches, config=config_from_arguments(args),
                         target=args.target_db)
    print(_formatted(report, args.format))
    if args.output is not None:
        written = report.save(args.output)
        LOG.info("wrote %s", ", ".join(written))
    return 0


def _formatted(report: object, form: str) -> str:
    if form == "markdown":
        return report.to_markdown()
    if form == "json":
        return report.to_json()
    return str(report)
