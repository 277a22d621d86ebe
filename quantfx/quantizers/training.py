"""QAT's own quantizers: an activation range from a moving average of each batch's min/max
(all-reduced across DDP ranks) rounded up to a power of 2, with the clipped straight-through
estimator (`QATQuantizer`, PACT2's statistical half), or from a learned log2 threshold
(`LearnedRangeQuantizer`, TQT); and a weight's learned threshold (`LearnedWeightQuantizer`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from quantfx.inputs import check_quantizer_input
from quantfx.observers import MovingAverageMinMaxObserver, Observer, masked_floor, unmasked
from quantfx.qmath import (
    fake_quantize,
    fake_quantize_learned,
    fake_quantize_ste,
    weight_exponent,
)
from quantfx.quantizers.base import CalibrationQuantizer, WeightQuantizer
from quantfx.ranks import world_size


def _reduce_min_max(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """Global min/max over all DDP ranks (identity when torch.distributed is not running)."""
    if world_size() == 1:  # no process group, or this_process_only()
        return low, high
    pair = torch.stack([-low, high])
    dist.all_reduce(pair, op=dist.ReduceOp.MAX)
    return -pair[0], pair[1]

class QATQuantizer(CalibrationQuantizer):
    """Activation quantizer for QAT: moving-average range (DDP-reduced), STE fake quantization.

    Ranges update only in train mode with `observer_enabled`; `eval()` uses the current exponent.
    """

    def __init__(self, bits: int, signed: bool, momentum: float = 0.1) -> None:
        super().__init__(MovingAverageMinMaxObserver(momentum=momentum), bits, signed)
        self.set_mode(observe=True, quantize=True)

    def start_from_exponent(self, exponent: float) -> None:
        """Start the running range at the clip value of `exponent` (e.g. from calibration)."""
        clip = self.qmax * 2.0 ** float(exponent)
        self.observer.min_val.fill_(-clip if self.signed else 0.0)
        self.observer.max_val.fill_(clip)
        self.observer.observed.fill_(True)
        self.compute_exponent()

    def forward(self, x: Tensor) -> Tensor:
        check_quantizer_input(x, self.exponent)
        if self.training and bool(self.observer_enabled) and x.numel() > 0:
            low, high = torch.aminmax(x.detach().float())
            if bool(torch.isneginf(low)):  # masked values: the range of the others
                finite = unmasked(x).float()
                low, high = (torch.aminmax(finite) if finite.numel()
                             else (torch.zeros_like(low), torch.zeros_like(high)))
                low = torch.minimum(low, masked_floor(high))  # the grid reaches below it
            low, high = _reduce_min_max(low, high)
            self.observer(torch.stack([low, high]))
            self.compute_exponent()
        if not bool(self.quant_enabled) or not bool(self.observer.observed):
            return x
        if self.training:
            return fake_quantize_ste(x, self.exponent, self.qmin, self.qmax)
        return fake_quantize(x, self.exponent, self.qmin, self.qmax)


class LearnedRangeQuantizer(QATQuantizer):
    """QAT activation quantizer with a learned power-of-2 range (TQT, `QATSchedule.ranges`
    "learned"): its log2 threshold is a Parameter trained with the model (the exponent is
    ceil(log2_threshold) - (bits - 1), or - bits when unsigned). It starts from calibration's
    exponent, or from the first training batch's range; freezing the ranges stops it."""

    def __init__(self, bits: int, signed: bool, momentum: float = 0.1) -> None:
        super().__init__(bits, signed, momentum)
        self.offset = bits - 1 if signed else bits
        self.log2_threshold = nn.Parameter(torch.zeros(()))
        self.register_buffer("threshold_started", torch.tensor(False))

    def start_from_exponent(self, exponent: float) -> None:
        """Start at `exponent`: the threshold in the middle of its power-of-2 octave, so the
        first steps do not flip it."""
        super().start_from_exponent(exponent)
        with torch.no_grad():
            self.log2_threshold.fill_(float(self.exponent) + self.offset - 0.5)
        self.threshold_started.fill_(True)

    def compute_exponent(self) -> Tensor:
        """While learning, the threshold's exponent; frozen, the one stored at the freeze."""
        if not bool(self.threshold_started):
            return super().compute_exponent()
        if bool(self.observer_enabled):
            with torch.no_grad():
                self.exponent.copy_(torch.ceil(self.log2_threshold) - self.offset)
        return self.exponent

    def forward(self, x: Tensor) -> Tensor:
        if not bool(self.threshold_started):  # no calibration: the first batch's range
            output = super().forward(x)
            if bool(self.observer.observed):
                self.start_from_exponent(float(self.exponent))
            return output
        if not self.training:
            return super().forward(x)
        check_quantizer_input(x, self.exponent)
        learning = bool(self.observer_enabled)
        return fake_quantize_learned(x, self.log2_threshold, self.compute_exponent(),
                                     self.qmin, self.qmax, learn=learning)


class LearnedWeightQuantizer(WeightQuantizer):
    """A QAT weight quantizer with learned power-of-2 threshold(s) (TQT;
    `QATSchedule.weight_exponent` "learned"): one log2 threshold per tensor, or per output
    channel where the weight is quantized per channel; the exponent is
    ceil(log2_threshold) - (bits - 1), so it moves only when training carries a threshold
    across a power of 2, never because one weight crossed a grid edge. It starts from
    calibration's exponent, or from the never-clipping exponent of the first weight it sees."""

    def __init__(self, observer: Observer, bits: int, axis: int | None = None) -> None:
        super().__init__(observer, bits, axis, rule="learned")
        self.log2_threshold = nn.Parameter(torch.zeros(self.exponent.shape))
        self.register_buffer("threshold_started", torch.tensor(False))

    def start_from_exponent(self, exponent: Tensor) -> None:
        """Start at `exponent`: each threshold in the middle of its octave."""
        with torch.no_grad():
            self.exponent.copy_(exponent)
            self.log2_threshold.copy_(self.exponent + (self.bits - 1) - 0.5)
        self.threshold_started.fill_(True)

    def exponent_for(self, weight: Tensor) -> Tensor:
        if not bool(self.threshold_started):
            self.start_from_exponent(weight_exponent(weight.detach(), self.qmax, self.axis,
                                                     "minmax"))
        return torch.ceil(self.log2_threshold.detach()) - (self.bits - 1)

    def fake_quantize_training(self, weight: Tensor, exponent: Tensor) -> Tensor:
        """TQT's forward and gradients, the weight's clipped where it saturates."""
        return fake_quantize_learned(weight, self.log2_threshold, exponent, self.qmin,
                                     self.qmax, axis=self.axis)
