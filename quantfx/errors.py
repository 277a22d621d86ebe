"""Errors quantfx raises on bad input: one base class, one subclass per stage.

Every message says what is wrong and how to fix it, so users never have to read a traceback
from deep inside torch to learn that their calibration data was empty.
"""

from __future__ import annotations


class QuantFxError(Exception):
    """Base class of every error quantfx raises on bad input or unsupported models."""


class ConfigError(QuantFxError, ValueError):
    """A `QuantConfig` field (or an argument of a public function) has an invalid value."""


class TraceError(QuantFxError):
    """The model cannot be traced symbolically by torch.fx."""


class PrepareError(QuantFxError):
    """The model traced but cannot be prepared (wrong example inputs, nothing to quantize)."""


class CalibrationError(QuantFxError):
    """Calibration data is missing, empty, non-finite or does not fit the model."""


class ConvertError(QuantFxError):
    """The model cannot be converted (not prepared, or not calibrated)."""


class ExportError(QuantFxError):
    """The model cannot be exported, or the exported file does not match PyTorch."""


class InputError(QuantFxError, TypeError):
    """A tensor given to a quantfx model (or to calibrate) has the wrong dtype, device or shape."""


class LoadError(QuantFxError):
    """A model, weights file or data set named by the user cannot be found or read."""


class NonFiniteError(CalibrationError):
    """A tensor holds NaN or Inf where quantfx observes its range (data or model at fault)."""

    def __init__(self, source: object = None, tensor: str = "") -> None:
        self.source = source
        """The observer that saw the values (to name the tensor)."""
        where = f"tensor {tensor!r}" if tensor else "a tensor inside the model"
        super().__init__(
            f"{where} holds NaN or infinite values while quantfx estimates its range: every "
            "range after it would be meaningless. Check the data for NaN/Inf and the model for "
            "operations that make them (sqrt or log of negative values, division by zero, "
            "float16 overflow); fix them, then calibrate (or train) again.")
