"""quantfx: torch.fx graph-mode power-of-2 fixed-point quantization for TIDL-class engines.

    qm = qf.prepare(model, example_inputs)      # observers on every quantized tensor
    qf.calibrate(qm, data)                      # ranges
    cm = qf.convert(qm)                         # integer-exact simulation
"""

from quantfx.config import QuantConfig
from quantfx.convert import convert
from quantfx.errors import (
    CalibrationError,
    ConfigError,
    ConvertError,
    ExportError,
    PrepareError,
    QuantFxError,
    TraceError,
)
from quantfx.ptc import calibrate, prepare

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "ConfigError",
    "ConvertError",
    "ExportError",
    "PrepareError",
    "QuantConfig",
    "QuantFxError",
    "TraceError",
    "calibrate",
    "convert",
    "prepare",
]
