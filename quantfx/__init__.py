"""quantfx: torch.fx graph-mode power-of-2 fixed-point quantization for TIDL-class engines.

    qm = qf.prepare(model, example_inputs)      # observers on every quantized tensor
    qf.calibrate(qm, data)                      # ranges
    cm = qf.convert(qm)                         # integer-exact simulation
"""

from quantfx.analysis.analyze import AnalysisReport, analyze
from quantfx.analysis.doctor import DoctorReport, doctor
from quantfx.analysis.precision import PrecisionReport, compare_bit_depths
from quantfx.config import QATSchedule, QuantConfig
from quantfx.convert import convert
from quantfx.errors import (
    CalibrationError,
    ConfigError,
    ConvertError,
    ExportError,
    InputError,
    LoadError,
    NonFiniteError,
    PrepareError,
    QuantFxError,
    TraceError,
)
from quantfx.export.meta_arch import PriorBoxes, SsdMetaArch, TorchvisionSsdNetwork, YoloxMetaArch
from quantfx.export.onnx import ExportReport, export_onnx
from quantfx.partial import parts_of
from quantfx.ptc import calibrate, prepare
from quantfx.qat import end_qat_epoch, prepare_qat
from quantfx.tidl.checker import TidlReport, check_tidl
from quantfx.tidl.profiles import TARGETS
from quantfx.version import __version__

__all__ = [
    "__version__",
    "AnalysisReport",
    "CalibrationError",
    "ConfigError",
    "ConvertError",
    "DoctorReport",
    "ExportError",
    "ExportReport",
    "InputError",
    "LoadError",
    "NonFiniteError",
    "PrecisionReport",
    "PrepareError",
    "PriorBoxes",
    "QATSchedule",
    "QuantConfig",
    "QuantFxError",
    "SsdMetaArch",
    "TARGETS",
    "TidlReport",
    "TorchvisionSsdNetwork",
    "TraceError",
    "YoloxMetaArch",
    "analyze",
    "calibrate",
    "check_tidl",
    "compare_bit_depths",
    "convert",
    "doctor",
    "export_onnx",
    "end_qat_epoch",
    "parts_of",
    "prepare",
    "prepare_qat",
]
