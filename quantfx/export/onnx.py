"""`export_onnx`: write a converted quantfx model as a QDQ ONNX model (or a legacy float model
with Clip ranges) plus its TIDL compile options, and verify it bit for bit in ONNX Runtime.

This module holds the entry point, its report and its argument checks; the graph is built in
`quantfx.export.graph` (from the emitters of `quantfx.export.registry`), checked in
`quantfx.export.verify`, and written by `quantfx.files`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any

import onnx
import torch
import torch.fx as fx
from torch import Tensor

from quantfx.checks import check_bool, check_int, check_number
from quantfx.errors import ExportError, warn
from quantfx.export.graph import build_model
from quantfx.export.meta_arch import MetaArch
from quantfx.export.postprocess import check_detection, run_detector, whole_detector
from quantfx.export.report import ExportReport
from quantfx.export.stepwise import verify_stepwise
from quantfx.export.tidl import bit_widths, compile_options
from quantfx.export.verify import (
    clip_simulation,
    cpu_dot_product_extension,
    disagreement,
    verification_batches,
    verify,
)
from quantfx.files import check_destination, options_path_for, staged_files
from quantfx.inputs import check_input_tensors, parameter_dtype_device
from quantfx.layers import IntegerLayer
from quantfx.partial import catching_calls, model_inputs, part_calls, quantized_parts, run_batch
from quantfx.quantizers import FrozenQuantizer
from quantfx.state import CONVERTED, PTC, QAT, require_state, state_of, unwrap
from quantfx.tidl.checker import check_model
from quantfx.tidl.format import format_problems
from quantfx.tidl.profiles import DeviceProfile
from quantfx.version import __version__

DEFAULT_QDQ_OPSET = 18
"""What TI's own exporters write (edgeai-modeloptimization v3: 18, v2: 17), inside the range
TIDL validates (11.0: up to 19, 11.2: 21); HardSwish is one op from 14. Every profile's default
(`quantfx.tidl.profiles`)."""
MIN_QDQ_OPSET = 13
"""Lowest opset with per-channel DequantizeLinear (depthwise weights)."""
DEFAULT_LEGACY_OPSET = 11
"""TDA4VM-era TIDL imports opset 11 float models (Clip takes its bounds as inputs from 11)."""
INT16_QDQ_OPSET = 21
"""int16/uint16 QuantizeLinear/DequantizeLinear are standard ONNX from opset 21."""
MIN_OPSET, MAX_OPSET = 11, 21

__all__ = ["ExportReport", "export_onnx", "options_path_for"]


def _check_inputs(model: fx.GraphModule, example_inputs: Any) -> tuple[Tensor, ...]:
    given = state_of(model)
    fix = ("Run cm = quantfx.convert(qat_model) and export cm." if given is not None
           and given.backend == QAT else "Run cm = quantfx.convert(quantfx.calibrate("
           "quantfx.prepare(model, inputs), data)) and export cm.")
    state = require_state(model, "export_onnx", ExportError,
                          ((PTC, CONVERTED), (QAT, CONVERTED)), "a converted model", fix)
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs or not all(
            isinstance(t, Tensor) for t in example_inputs):
        raise ExportError(
            f"example_inputs must be a tensor or a non-empty tuple of tensors, got "
            f"{type(example_inputs).__name__}. Example: (torch.randn(1, 3, 224, 224),)"
        )
    placeholders = [node for node in model.graph.nodes if node.op == "placeholder"]
    required = [node for node in placeholders if not node.args]  # no default value
    if not len(required) <= len(example_inputs) <= len(placeholders):
        raise ExportError(
            f"the model takes {len(required)} input(s) "
            f"({', '.join(node.name for node in required)}) but example_inputs holds "
            f"{len(example_inputs)} tensor(s)."
        )
    dtype, _ = parameter_dtype_device(model)
    check_input_tensors(example_inputs, dtype, "example input", ExportError)
    for index, (tensor, shape) in enumerate(zip(example_inputs, state.input_shapes)):
        if tensor.dim() != len(shape):
            raise ExportError(
                f"example input {index} has shape {tuple(tensor.shape)} but the model was "
                f"prepared with rank-{len(shape)} inputs {shape}; give the same layout (with a "
                "batch dimension)."
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ExportError(
                f"example input {index} holds NaN or Inf values: the export verifies the file on "
                "the example inputs, and NaN agrees with NaN whatever the file computes. Give "
                "real inputs (a sample of the data).")
    return tuple(t.detach().cpu() for t in example_inputs)


def _check_options(path: Any, opset: Any, verify: Any, legacy: Any, max_lsb_diff: Any,
                   threads: Any) -> str:
    """Type-check export_onnx's options; returns `path` as a string."""
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"path must be a file path (str or os.PathLike), got "
                          f"{type(path).__name__}. Example: 'out/model.onnx'.")
    if "\0" in os.fspath(path):
        raise ExportError(f"path {os.fspath(path)!r} holds a NUL character.")
    check_bool(verify, "verify", ExportError)
    check_bool(legacy, "legacy", ExportError)
    if opset is not None:
        check_int(opset, "opset", error=ExportError, example="13, or None for the default")
    if max_lsb_diff is not None and max_lsb_diff != float("inf"):  # inf: never refuse
        check_number(max_lsb_diff, "max_lsb_diff", 0.0, error=ExportError,
                     example="1.0, float('inf') to never refuse, or None for the default")
    check_int(threads, "threads", 1, error=ExportError, example="1")
    path = os.path.expanduser(os.fspath(path))
    if path and not path.endswith(("/", os.sep)) and not os.path.isdir(path) and (
            not path.lower().endswith(".onnx")):  # onnx.load reads .json / .txt as text
        raise ExportError(f"the model path {path!r} must end with .onnx (the TIDL options "
                          "go beside it as NAME.tidl.json).")
    return os.path.realpath(path) if os.path.islink(path) else path  # write through a link


def _choose_opset(opset: int | None, legacy: bool, needs_int16: bool,
                  profile: DeviceProfile) -> int:
    if opset is None:
        default = DEFAULT_LEGACY_OPSET if legacy else profile.default_opset
        return max(default, INT16_QDQ_OPSET) if needs_int16 and not legacy else default
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset={opset!r} is not supported; use {MIN_OPSET}..{MAX_OPSET} (or "
                          "None for the TIDL default).")
    if not legacy and opset < MIN_QDQ_OPSET:
        raise ExportError(f"QDQ export needs opset >= {MIN_QDQ_OPSET} (per-channel "
                          f"DequantizeLinear), got {opset}. Use opset=None or legacy=True.")
    if needs_int16 and not legacy and opset < INT16_QDQ_OPSET:
        raise ExportError(
            f"this model has 16-bit tensors, whose QuantizeLinear/DequantizeLinear need opset "
            f">= {INT16_QDQ_OPSET}; got opset={opset}. Use opset=None or {INT16_QDQ_OPSET}, or "
            "calibrate with QuantConfig(widen_sensitive_layers=False, widen_coarse_weights=False) "
            "and no sixteen_bit_layers for a file with 8-bit tensors only."
        )
    return opset


def export_onnx(
    model: fx.GraphModule,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    verify: bool = True,
    verify_data: Any = None,
    legacy: bool = False,
    max_lsb_diff: float | None = None,
    threads: int = 1,
    strict_tidl: bool = False,
    part: str | None = None,
    detection: MetaArch | None = None,
) -> ExportReport:
    """Write converted `model` to `path` as QDQ ONNX (or, with `legacy=True`, float ONNX with
    Clip ranges for pre-QDQ TIDL) and its TIDL options to `<path stem>.tidl.json`.

    The shapes are static, taken from `example_inputs`. With `verify` (the default) the file is
    run in ONNX Runtime on `example_inputs` (and `verify_data`) and compared with `model`; if an
    output differs by more than `max_lsb_diff` LSBs (default: 1 for 8-bit outputs, 32 for
    16-bit ones) nothing is written and `ExportError` is raised. Writes are atomic: a failed
    export leaves no file behind. The file is checked against TIDL's rules for the model's
    `QuantConfig.target` (`report.tidl`); with `strict_tidl` a node that would fall back to
    the ARM cores is an `ExportError` instead of a line in the report.

    A partly quantized model (`QuantConfig.quantize_only`) is exported one quantized `part` at
    a time: `example_inputs` (and `verify_data`) are then the whole model's, and the file holds
    the part, with the inputs it receives from them.

    `detection` (a `quantfx.YoloxMetaArch`, `quantfx.Yolov8MetaArch` or `quantfx.SsdMetaArch`)
    says the model's outputs are a detector's head tensors: they are verified as above, then
    decode and NMS are added as float ONNX ops (outputs boxes, labels, scores; batch 1) and
    TIDL's meta-architecture file is written beside the model (`<path stem>.prototxt`, named
    in the options file).
    """
    model = unwrap(model)
    if part is not None or quantized_parts(state_of(model)):
        model, example_inputs, verify_data = _part_to_export(model, part, example_inputs,
                                                            verify_data)
    inputs = _check_inputs(model, example_inputs)
    path = _check_options(path, opset, verify, legacy, max_lsb_diff, threads)
    check_bool(strict_tidl, "strict_tidl", ExportError)
    check_detection(detection, legacy, inputs)
    model = _on_cpu(model)
    built = build_export(model, inputs, opset, legacy)
    detection_files = whole_detector(built.model, detection, inputs, path, built.options)
    report = _report(model, path, built)
    if strict_tidl and not report.tidl.fully_offloaded:
        raise ExportError(f"strict_tidl: {report.tidl.summary()}. Nothing was written; the "
                          "reasons are in quantfx.check_tidl(...) of a non-strict export.")
    batches = verification_batches(inputs, verify_data)  # checked even when verify=False
    try:
        with staged_files(*_destinations(report, detection_files)) as temporaries:
            _save_verified(model, built, temporaries, detection_files, report,
                           batches if verify else None, inputs, max_lsb_diff, threads)
    except OSError as error:
        raise ExportError(f"could not write {path!r} (or its options file): "
                          f"{error.strerror or error}. Nothing was written.") from error
    return report


def _destinations(report: ExportReport, detection_files: dict | None) -> list[str]:
    """The files the export will write (checked writable): model, options, prototxt."""
    check_destination(report.path, "model")
    check_destination(report.options_path, "TIDL options")
    finals = [report.path, report.options_path]
    stale = os.path.splitext(report.path)[0] + ".prototxt"
    if detection_files is None and os.path.exists(stale):  # an earlier detection export's
        warn(f"{stale!r} sits beside this export, which has no detection post-processing "
             "(no detection=): it describes an earlier file. Delete it, so it is not shipped "
             "with this model.")
    if detection_files is not None:
        report.prototxt_path, report.head_outputs, report.detection_outputs = (
            detection_files["path"], detection_files["heads"], detection_files["outputs"])
        check_destination(report.prototxt_path, "detection meta-architecture")
        finals.append(report.prototxt_path)
    return finals


@dataclass
class BuiltExport:
    """The build step's result: the ONNX graph, its opset, its 16-bit tensors, TIDL options."""

    model: onnx.ModelProto
    opset: int
    legacy: bool
    widths: Any
    options: dict
    profile: DeviceProfile
    names: dict[fx.Node, Any]
    """FX node -> ONNX tensor name (step-by-step verification reads the quantized tensors)."""


def build_export(model: fx.GraphModule, inputs: tuple[Tensor, ...], opset: int | None = None,
                 legacy: bool = False) -> BuiltExport:
    """Build step of `export_onnx` (nothing written): the opset (21 where a tensor is 16 bit),
    the ONNX graph of the converted CPU `model`, TIDL's structural constraints, the options."""
    profile = state_of(model).config.profile
    needs_int16 = any(
        (isinstance(module, FrozenQuantizer) and module.bits == 16)
        or (isinstance(module, IntegerLayer) and module.weight_bits == 16)
        for module in model.modules()
    )
    chosen_opset = _choose_opset(opset, legacy, needs_int16, profile)
    built = build_model(model, inputs, legacy, chosen_opset)
    problems = format_problems(built.model)
    if problems:
        raise ExportError("the exported graph breaks TIDL constraints: " + "; ".join(problems))
    widths = bit_widths(model, built.emitted, built.names)
    options = compile_options(widths, legacy, profile)
    _record_target(built.model, profile)
    return BuiltExport(built.model, chosen_opset, legacy, widths, options, profile,
                       built.names)


def _report(model: fx.GraphModule, path: str, built: BuiltExport) -> ExportReport:
    """The report of a built export, before verification fills in its agreement figures."""
    check = state_of(model).calibration_check
    return ExportReport(
        path=path, options_path=options_path_for(path), opset=built.opset, legacy=built.legacy,
        tidl_options=built.options, sixteen_bit_features=built.widths.sixteen_bit_features(),
        sixteen_bit_params=built.widths.sixteen_bit_params(), target=built.profile.name,
        tidl=check_model(built.model, built.profile.name),
        calibration_sqnr_db=getattr(check, "output_sqnr_db", None),
        measured_sixteen_bit=list(state_of(model).measured_sixteen_bit),
    )


def _save_verified(model: fx.GraphModule, built: BuiltExport, temporaries: list[str],
                   detection_files: dict | None, report: ExportReport, batches: Any,
                   inputs: tuple[Tensor, ...], max_lsb_diff: float | None, threads: int) -> None:
    """Save step: the model and its options into their staged files, verified in ONNX Runtime
    on `batches` (None: not verified), then the whole detector and its prototxt."""
    temporary_model, temporary_options = temporaries[:2]
    onnx.save(built.model, temporary_model)
    with open(temporary_options, "w", encoding="utf-8") as handle:
        json.dump(built.options, handle, indent=2)
        handle.write("\n")
    if batches is not None:
        _verify_file(model, built, temporary_model, batches, max_lsb_diff, threads, report)
    if detection_files is not None:  # the heads verified: now the whole detector
        onnx.save(detection_files["model"], temporary_model)
        if batches is not None:
            run_detector(temporary_model, inputs, threads)
        with open(temporaries[2], "w", encoding="utf-8") as handle:
            handle.write(detection_files["text"])


def _on_cpu(model: fx.GraphModule) -> fx.GraphModule:
    """The converted model in eval mode on the CPU (a copy if it lives elsewhere): export and
    ONNX Runtime verification run there."""
    _, device = parameter_dtype_device(model)
    if device.type == "cpu":
        return model.eval()
    return copy.deepcopy(model).cpu().eval()


def _record_target(model: onnx.ModelProto, profile: DeviceProfile) -> None:
    """Which device and TIDL tools version the file was written for, in its metadata."""
    entries = {"quantfx.version": __version__, "quantfx.target": profile.name}
    if profile.tidl:
        entries["quantfx.tidl_tools_version"] = profile.tidl_tools_version
    onnx.helper.set_model_props(model, entries)


def _part_to_export(model: Any, part: str | None, example_inputs: Any,
                    verify_data: Any) -> tuple[Any, tuple, list | None]:
    """(the part, its example inputs, its verification inputs) of a partly quantized model."""
    state = state_of(model)
    parts = quantized_parts(state)
    if not parts:
        raise ExportError(f"part={part!r} is for partly quantized models "
                          "(QuantConfig.quantize_only); this one is quantized whole: leave it out.")
    if part is None or part not in parts:
        given = "no part" if part is None else f"part={part!r}"
        raise ExportError(f"this model is partly quantized; export one of its quantized parts "
                          f"({', '.join(parts)}) with part=..., got {given}.")
    if state.stage != CONVERTED:
        raise ExportError("export_onnx needs a converted model: call quantfx.convert first.")
    calls = part_calls(model, [part], model_inputs(example_inputs))
    batches = None
    if verify_data is not None:
        batches = []
        items = [verify_data] if isinstance(verify_data, torch.Tensor) else verify_data
        for batch in items:
            with catching_calls(model, [part]) as caught, torch.no_grad():
                run_batch(model, batch, state.input_count)
            batches.append(caught[part].tensor_inputs())
    return model.get_submodule(part), calls[part].tensor_inputs(), batches


def _verify_file(model: fx.GraphModule, built: BuiltExport, temporary_model: str,
                 batches: list[tuple[Tensor, ...]], max_lsb_diff: float | None,
                 threads: int, report: ExportReport) -> None:
    """Verify step: end to end; where that differs by more than the default tolerance, step by
    step (`quantfx.export.stepwise`), which decides."""
    legacy = built.legacy
    reference = clip_simulation(model) if legacy else model
    figures = verify(model, temporary_model, batches, reference, threads, max_lsb_diff)
    report.verified = True
    report.elements_compared = figures["elements_compared"]
    report.fraction_identical = figures["fraction_identical"]
    report.max_lsb_diff = figures["max_lsb_diff"]
    report.argmax_agreement = figures["argmax_agreement"]
    report.output_scales = figures["output_scales"]
    stepwise = None
    if not figures["within_tolerance"] and not legacy and max_lsb_diff is None:
        stepwise = verify_stepwise(model, built.model, built.names, batches, threads)
        report.stepwise = stepwise
    if not figures["within_tolerance"] and (stepwise is None or not stepwise.within_tolerance):
        error = disagreement(figures, model, legacy, stepwise)
        error.report = report  # type: ignore[attr-defined] - the figures, for tools
        raise error
    if not legacy:  # what a deployment session on this CPU computes, reported as measured
        report.cpu_dot_product = cpu_dot_product_extension()
        try:
            optimized = verify(model, temporary_model, batches, reference, threads,
                               max_lsb_diff, optimized=True)
        except Exception as error:  # noqa: BLE001 - ONNX Runtime's optimizer, not the file
            report.optimized_error = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            return
        report.optimized_fraction_identical = optimized["fraction_identical"]
        report.optimized_max_lsb_diff = optimized["max_lsb_diff"]
