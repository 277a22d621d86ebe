"""`ExportReport`: what `export_onnx` wrote, how the file agrees with the model in ONNX
Runtime, and what TIDL would run of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quantfx.export.stepwise import StepwiseFigures
from quantfx.tidl.checker import TidlReport


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
    optimized_fraction_identical: float | None = None
    """The same comparison in ONNX Runtime's deployment session (all graph optimizations, its
    integer kernels) on this CPU: exact with VNNI, not always without (docs/export.md)."""
    optimized_max_lsb_diff: float | None = None
    cpu_dot_product: str | None = None
    """This CPU's integer dot-product extension ("avx512_vnni", ...), or None."""
    optimized_error: str | None = None
    """Why ONNX Runtime's deployment session could not run the file, if it could not (its
    graph optimizer, e.g. on some opset-21 Q/DQ around transposes; the file itself passed)."""
    target: str = "generic"
    tidl: TidlReport | None = None
    """What TIDL would run on the accelerator for `target` (`quantfx.check_tidl`)."""
    prototxt_path: str | None = None
    """The detection meta-architecture file written beside the model (`detection=`)."""
    head_outputs: list[str] = field(default_factory=list)
    """The head tensors the prototxt names (graph outputs, before decode and NMS)."""
    detection_outputs: list[str] = field(default_factory=list)
    """The float decode + NMS outputs after them: boxes, labels, scores."""
    calibration_sqnr_db: float | None = None
    """The converted model's output SQNR against float on calibration samples, measured at the
    end of `calibrate` (None for QAT models and partly quantized ones)."""
    measured_sixteen_bit: list[str] = field(default_factory=list)
    """The layers and tensors calibration widened to 16 bit by measurement
    (`QuantConfig.widen_sensitive_layers`)."""
    stepwise: StepwiseFigures | None = None
    """Set when the outputs differed by more than the default tolerance end to end (float32
    sums that are not exact, compounded over depth) and the file was verified step by step
    instead: each quantized tensor from the file's own quantized inputs
    (`quantfx.export.stepwise`)."""

    def summary(self) -> str:
        """A few lines for logs: agreement in both ONNX Runtime sessions, TIDL's verdict."""
        tidl = f"\n  TIDL {self.tidl.summary()}" if self.tidl is not None else ""
        if self.calibration_sqnr_db is not None:
            tidl += (f"\n  calibration check: output SQNR {self.calibration_sqnr_db:.1f} dB "
                     "against float")
        if self.measured_sixteen_bit:
            tidl += f"\n  16 bit by measurement: {', '.join(self.measured_sixteen_bit)}"
        if self.prototxt_path is not None:
            tidl += (f"\n  detection: heads {', '.join(self.head_outputs)} -> "
                     f"{', '.join(self.detection_outputs)}; meta-architecture "
                     f"{self.prototxt_path}")
        if not self.verified:
            return f"{self.path}: opset {self.opset}, not verified{tidl}"
        argmax = "n/a" if self.argmax_agreement is None else f"{100 * self.argmax_agreement:.2f}%"
        optimized = ""
        if self.optimized_error is not None:
            optimized = f"\n  ONNX Runtime optimized session failed: {self.optimized_error}"
        if self.optimized_fraction_identical is not None:
            optimized = (f"\n  ONNX Runtime optimized session on this CPU "
                         f"({self.cpu_dot_product or 'no VNNI'}): "
                         f"{100 * self.optimized_fraction_identical:.3f}% bit-identical, max "
                         f"{self.optimized_max_lsb_diff:g} LSB")
        stepwise = ""
        if self.stepwise is not None:
            worst = (f", most at '{self.stepwise.worst_step}'" if self.stepwise.worst_step
                     else "")
            stepwise = (f"\n  step by step (each of {self.stepwise.steps} quantized tensors from "
                        f"the file's own inputs): {100 * self.stepwise.fraction_identical:.3f}% "
                        f"bit-identical, max {self.stepwise.max_lsb_diff:g} LSB{worst}; end to "
                        "end, those 1-LSB flips (float steps such as Resize weights, Softmax or "
                        "LayerNorm that ONNX Runtime rounds differently, or sums past 2**24) "
                        "grow through the layers after them")
        return (f"{self.path}: opset {self.opset}, {self.elements_compared} elements, "
                f"{100 * self.fraction_identical:.3f}% bit-identical in ONNX Runtime's reference "
                f"kernels, max {self.max_lsb_diff:g} LSB, argmax agreement {argmax}"
                f"{stepwise}{optimized}{tidl}")
