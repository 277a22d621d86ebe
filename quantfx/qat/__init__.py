"""Quantization-aware training: `prepare_qat`, the QAT layer and quantizer, the schedule.

`prepare_qat` builds the model (`quantfx.qat.prepare`), `QATLayer` folds BatchNorm on the fly
(`quantfx.qat.layer`), `QATController` applies the `QATSchedule` (`quantfx.qat.controller`);
the activation quantizer, `QATQuantizer`, is built with every other quantizer in
`quantfx.quantizers`.
"""

from quantfx.config import QATSchedule
from quantfx.qat.controller import QATController, end_qat_epoch, freeze_batchnorm, freeze_ranges
from quantfx.qat.layer import QATLayer
from quantfx.qat.prepare import lower_qat_layers, prepare_qat
from quantfx.quantizers import QATQuantizer

QATFakeQuantize = QATQuantizer
"""The name `QATQuantizer` had before 0.2 (kept importable)."""

__all__ = [
    "QATController",
    "QATFakeQuantize",
    "QATLayer",
    "QATQuantizer",
    "QATSchedule",
    "end_qat_epoch",
    "freeze_batchnorm",
    "freeze_ranges",
    "lower_qat_layers",
    "prepare_qat",
]
