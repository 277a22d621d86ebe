"""quantfx: torch.fx graph-mode power-of-2 fixed-point quantization for TIDL-class engines.

    qm = qf.prepare(model, example_inputs)      # observers on every quantized tensor
    qf.calibrate(qm, data)                      # ranges
    cm = qf.convert(qm)                         # integer-exact simulation
"""

import importlib
import logging
import sys
import types
from typing import Any

from quantfx.errors import (
    CalibrationError,
    ConfigError,
    ConvertError,
    ExportError,
    InputError,
    InternalError,
    LoadError,
    NonFiniteError,
    PrepareError,
    QuantFxError,
    QuantFxWarning,
    TraceError,
)
from quantfx.version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())  # silent unless the app logs

_LAZY = {
    "quantfx.analysis.analyze": ("AnalysisReport", "analyze"),
    "quantfx.analysis.doctor": ("DoctorReport", "doctor"),
    "quantfx.analysis.precision": ("PrecisionReport", "compare_bit_depths"),
    "quantfx.config": ("QATSchedule", "QuantConfig"),
    "quantfx.convert": ("convert",),
    "quantfx.distillation": ("distill",),
    "quantfx.export.meta_arch": ("PriorBoxes", "SsdMetaArch", "TorchvisionSsdNetwork",
                                 "Yolov8MetaArch", "YoloxMetaArch"),
    "quantfx.export.networks": ("UltralyticsYolov8Network",),
    "quantfx.export.onnx": ("ExportReport", "export_onnx"),
    "quantfx.partial": ("parts_of",),
    "quantfx.ptc": ("calibrate", "prepare"),
    "quantfx.qat": ("end_qat_epoch", "prepare_qat"),
    "quantfx.ranks": ("this_process_only",),
    "quantfx.tidl.checker": ("TidlReport", "check_tidl"),
    "quantfx.tidl.profiles": ("TARGETS",),
}
"""Module -> the public names it provides. They load on first use, so `import quantfx` (and
the command line's `--help`) does not import torch until something needs it."""
_HOME = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        try:  # a submodule, e.g. quantfx.qmath
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'quantfx' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps a public name from being replaced by the submodule of the same name (importing
    `quantfx.convert` would otherwise make `quantfx.convert` the module, not the function)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOME and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
    "InternalError",
    "LoadError",
    "NonFiniteError",
    "PrecisionReport",
    "PrepareError",
    "PriorBoxes",
    "QATSchedule",
    "QuantConfig",
    "QuantFxError",
    "QuantFxWarning",
    "SsdMetaArch",
    "TARGETS",
    "TidlReport",
    "TorchvisionSsdNetwork",
    "TraceError",
    "UltralyticsYolov8Network",
    "Yolov8MetaArch",
    "YoloxMetaArch",
    "analyze",
    "calibrate",
    "check_tidl",
    "compare_bit_depths",
    "convert",
    "distill",
    "doctor",
    "export_onnx",
    "end_qat_epoch",
    "parts_of",
    "prepare",
    "prepare_qat",
    "this_process_only",
]
