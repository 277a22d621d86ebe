"""`export_onnx`: write a converted quantfx model as a QDQ ONNX model (or a legacy float model
with Clip ranges) plus its TIDL compile options, and verify it bit for bit in ONNX Runtime.

This module holds the entry point, its report and its argument checks; the graph is built in
`quantfx.export.graph` (from the emitters of `quantfx.export.registry`), checked in
`quantfx.export.verify`, and written by `quantfx.export.files`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch.fx as fx
from torch import Tensor

from quantfx.checks import check_bool, check_int, check_number
from quantfx.errors import ExportError
from quantfx.export.files import check_destination, options_path_for, staged_files
from quantfx.export.graph import build_model
from quantfx.export.tidl import bit_widths, check_constraints, compile_options
from quantfx.export.verify import clip_simulation, disagreement, verification_batches, verify
from quantfx.inputs import check_input_tensors, parameter_dtype_device
from quantfx.layers import IntegerLayer
from quantfx.quantizers import FrozenQuantizer
from quantfx.state import CONVERTED, PTC, QAT, require_state

DEFAULT_QDQ_OPSET = 13
"""Lowest opset with per-channel DequantizeLinear (depthwise weights): the widest TIDL support."""
DEFAULT_LEGACY_OPSET = 11
"""TDA4VM-era TIDL imports opset 11 float models (Clip takes its bounds as inputs from 11)."""
INT16_QDQ_OPSET = 21
"""int16/uint16 QuantizeLinear/DequantizeLinear are standard ONNX from opset 21."""
MIN_OPSET, MAX_OPSET = 11, 21

__all__ = ["ExportReport", "export_onnx", "options_path_for"]


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how closely ONNX Runtime reproduces the PyTorch model."""

    path: str
    options_path: str
    opset: int
    legacy: bool
    tidl_options: dict[str, Any]
    sixteen_bit_features: list[str] = field(default_factory=list)
    sixteen_bit_params: list[str] = field(default_factory=list)
    verified: bool = False
    elements_compared: int = 0
    fraction_identical: float | None = None
    """Share of output elements that are bit-identical (QDQ) to the converted model."""
    max_lsb_diff: float | None = None
    """Largest output difference in LSBs of the output quantizer's scale."""
    argmax_agreement: float | None = None
    """Share of rows whose argmax agrees (2-D outputs only: classifiers)."""
    output_scales: list[float | None] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs and tables."""
        if not self.verified:
            return f"{self.path}: opset {self.opset}, not verified"
        argmax = "n/a" if self.argmax_agreement is None else f"{100 * self.argmax_agreement:.2f}%"
        return (f"{self.path}: opset {self.opset}, {self.elements_compared} elements, "
                f"{100 * self.fraction_identical:.3f}% bit-identical, "
                f"max {self.max_lsb_diff:g} LSB, argmax agreement {argmax}")


def _check_inputs(model: fx.GraphModule, example_inputs: Any) -> tuple[Tensor, ...]:
    state = require_state(
        model, "export_onnx", ExportError, ((PTC, CONVERTED), (QAT, CONVERTED)),
        "a converted model",
        "Run cm = quantfx.convert(quantfx.calibrate(quantfx.prepare(model, inputs), data)) and "
        "export cm.")
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
    return tuple(t.detach().cpu() for t in example_inputs)


def _check_options(path: Any, opset: Any, verify: Any, legacy: Any, max_lsb_diff: Any,
                   threads: Any) -> str:
    """Type-check export_onnx's options; returns `path` as a string."""
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"path must be a file path (str or os.PathLike), got "
                          f"{type(path).__name__}. Example: 'out/model.onnx'.")
    check_bool(verify, "verify", ExportError)
    check_bool(legacy, "legacy", ExportError)
    if opset is not None:
        check_int(opset, "opset", error=ExportError, example="13, or None for the default")
    if max_lsb_diff is not None:
        check_number(max_lsb_diff, "max_lsb_diff", 0.0, error=ExportError,
                     example="1.0, or None for the default")
    check_int(threads, "threads", 1, error=ExportError, example="1")
    return os.fspath(path)


def _choose_opset(opset: int | None, legacy: bool, needs_int16: bool) -> int:
    if opset is None:
        default = DEFAULT_LEGACY_OPSET if legacy else DEFAULT_QDQ_OPSET
        return max(default, INT16_QDQ_OPSET) if needs_int16 and not legacy else default
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset={opset!r} is not supported; use {MIN_OPSET}..{MAX_OPSET} (or "
                          "None for the TIDL default).")
    if not legacy and opset < 13:
        raise ExportError(f"QDQ export needs opset >= 13 (per-channel DequantizeLinear), got "
                          f"{opset}. Use opset=None or legacy=True.")
    if needs_int16 and not legacy and opset < INT16_QDQ_OPSET:
        raise ExportError(
            f"this model has 16-bit tensors, whose QuantizeLinear/DequantizeLinear need opset "
            f">= {INT16_QDQ_OPSET}; got opset={opset}. Use opset=None or {INT16_QDQ_OPSET}."
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
) -> ExportReport:
    """Write converted `model` to `path` as QDQ ONNX (or, with `legacy=True`, float ONNX with
    Clip ranges for pre-QDQ TIDL) and its TIDL options to `<path stem>.tidl.json`.

    The shapes are static, taken from `example_inputs`. With `verify` (the default) the file is
    run in ONNX Runtime on `example_inputs` (and `verify_data`) and compared with `model`; if an
    output differs by more than `max_lsb_diff` LSBs (default: 1 for 8-bit outputs, 32 for
    16-bit ones) nothing is written and `ExportError` is raised. Writes are atomic: a failed
    export leaves no file behind.
    """
    inputs = _check_inputs(model, example_inputs)
    path = _check_options(path, opset, verify, legacy, max_lsb_diff, threads)
    needs_int16 = any(
        (isinstance(module, FrozenQuantizer) and module.bits == 16)
        or (isinstance(module, IntegerLayer) and module.weight_bits == 16)
        for module in model.modules()
    )
    chosen_opset = _choose_opset(opset, legacy, needs_int16)
    model = _on_cpu(model)
    built = build_model(model, inputs, legacy, chosen_opset)
    problems = check_constraints(built.model)
    if problems:
        raise ExportError("the exported graph breaks TIDL constraints: " + "; ".join(problems))
    widths = bit_widths(model, built.emitted, built.names)
    options = compile_options(widths, legacy)
    options_path = options_path_for(path)
    report = ExportReport(
        path=path, options_path=options_path, opset=chosen_opset, legacy=legacy,
        tidl_options=options, sixteen_bit_features=widths.sixteen_bit_features(),
        sixteen_bit_params=widths.sixteen_bit_params(),
    )
    batches = verification_batches(inputs, verify_data)  # checked even when verify=False
    check_destination(path, "model")
    check_destination(options_path, "TIDL options")
    try:
        with staged_files(path, options_path) as (temporary_model, temporary_options):
            onnx.save(built.model, temporary_model)
            with open(temporary_options, "w", encoding="utf-8") as handle:
                json.dump(options, handle, indent=2)
                handle.write("\n")
            if verify:
                _verify_file(model, temporary_model, batches, legacy, max_lsb_diff, threads,
                             report)
    except OSError as error:
        raise ExportError(f"could not write {path!r} (or its options file): "
                          f"{error.strerror or error}. Nothing was written.") from error
    return report


def _on_cpu(model: fx.GraphModule) -> fx.GraphModule:
    """The converted model in eval mode on the CPU (a copy if it lives elsewhere): export and
    ONNX Runtime verification run there."""
    _, device = parameter_dtype_device(model)
    if device.type == "cpu":
        return model.eval()
    return copy.deepcopy(model).cpu().eval()


def _verify_file(model: fx.GraphModule, temporary_model: str,
                 batches: list[tuple[Tensor, ...]], legacy: bool, max_lsb_diff: float | None,
                 threads: int, report: ExportReport) -> None:
    reference = clip_simulation(model) if legacy else model
    figures = verify(model, temporary_model, batches, reference, threads, max_lsb_diff)
    report.verified = True
    report.elements_compared = figures["elements_compared"]
    report.fraction_identical = figures["fraction_identical"]
    report.max_lsb_diff = figures["max_lsb_diff"]
    report.argmax_agreement = figures["argmax_agreement"]
    report.output_scales = figures["output_scales"]
    if not figures["within_tolerance"]:
        error = disagreement(figures, model, legacy)
        error.report = report  # type: ignore[attr-defined] - the figures, for tools
        raise error
