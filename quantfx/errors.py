"""Errors quantfx raises on bad input: one base class, one subclass per stage.

Every message says what is wrong and how to fix it, so users never have to read a traceback
from deep inside torch to learn that their calibration data was empty.
"""

from __future__ import annotations

import os
import sys
import warnings


class QuantFxError(Exception):
    """Base class of every error quantfx raises on bad input or unsupported models."""


class InternalError(QuantFxError, RuntimeError):
    """A quantfx bug, not the user's input: the message asks for a report with the model."""

    def __init__(self, message: str) -> None:
        super().__init__(f"internal error: {message} This is a quantfx bug: please report it "
                         "with the model (or a small model that shows it).")


class QuantFxWarning(UserWarning):
    """Category of every warning quantfx gives: filter them with
    `warnings.filterwarnings("ignore", category=quantfx.QuantFxWarning)`."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_TORCH_PARTS = (os.sep + "torch" + os.sep, os.sep + "contextlib.py")


def warn(message: str) -> None:
    """Warn with `QuantFxWarning`, attributed to the user's line that called quantfx (the
    first frame outside quantfx and torch), not to a line deep inside the package."""
    frame, level = sys._getframe(1), 2
    while frame is not None and (
            os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE)
            or any(part in frame.f_code.co_filename for part in _TORCH_PARTS)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, QuantFxWarning, stacklevel=level if frame is not None else 2)


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
