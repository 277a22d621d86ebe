"""The quantizer modules, one per tensor the engine holds in fixed point, and the one factory that
builds them.

- `CalibrationQuantizer` (prepared, PTC): an observer plus a power-of-2 quantizer. Two switches
  decide what a forward does: `observer_enabled` (record ranges) and `quant_enabled` (round to
  the grid). Calibration observes with quantization off; bias calibration quantizes.
- `QATQuantizer` (prepared, QAT): a moving average of each batch's min/max (all-reduced across
  DDP ranks), rounded up to a power of 2, with the clipped straight-through estimator.
- `FrozenQuantizer` (converted): a fixed exponent; rounds half to even and saturates.

`QuantizerFactory` is where every one of them is made: placement asks it for an activation or a
weight quantizer and it builds the PTC or the QAT kind from the `QuantConfig`.
"""

from quantfx.quantizers.base import (
    CalibrationQuantizer,
    FrozenQuantizer,
    Quantizer,
    WeightQuantizer,
)
from quantfx.quantizers.factory import QuantizerFactory
from quantfx.quantizers.modes import (
    calibration_quantizers,
    learned_thresholds,
    named_non_finite,
    quant_mode,
    set_quant_mode,
    thresholds_in,
)
from quantfx.quantizers.training import (
    LearnedRangeQuantizer,
    LearnedWeightQuantizer,
    QATQuantizer,
)

__all__ = [
    "CalibrationQuantizer", "FrozenQuantizer", "LearnedRangeQuantizer", "LearnedWeightQuantizer",
    "QATQuantizer",
    "Quantizer", "QuantizerFactory", "WeightQuantizer", "calibration_quantizers",
    "learned_thresholds", "thresholds_in", "named_non_finite", "quant_mode", "set_quant_mode",
]
