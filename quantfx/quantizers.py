"""Quantizer modules, one per tensor the engine holds in fixed point, and the one factory that
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

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from quantfx.config import QuantConfig
from quantfx.errors import LoadError, NonFiniteError
from quantfx.inputs import check_quantizer_input
from quantfx.layers import is_depthwise
from quantfx.modules import BatchNormLayer
from quantfx.observers import (
    MovingAverageMinMaxObserver,
    Observer,
    make_observer,
    masked_floor,
    unmasked,
)
from quantfx.qmath import (
    fake_quantize,
    fake_quantize_learned,
    fake_quantize_ste,
    qrange,
    scale_of,
    weight_exponent,
)


class Quantizer(nn.Module):
    """One tensor's grid: `bits` wide, signed or unsigned, per tensor or per channel along
    `axis`; its exponent(s) live in the `exponent` buffer."""

    def __init__(self, bits: int, signed: bool, axis: int | None = None,
                 channels: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.signed = signed
        self.axis = axis
        self.register_buffer("exponent", torch.zeros(channels))
        self.register_buffer("width", torch.tensor(bits))  # in the state_dict: widths can change
        self.register_buffer("measured", torch.tensor(False))  # widened by measurement
        self.placed_bits = bits  # placement's width; measured mixed precision may widen it
        self.set_bits(bits)

    def set_bits(self, bits: int) -> None:
        """Make the grid `bits` wide (measured mixed precision widens layers after prepare)."""
        self.bits = bits
        self.qmin, self.qmax = qrange(bits, self.signed)
        self.width.fill_(bits)

    def widen(self, bits: int) -> None:
        """Widen to `bits` because calibration measured that this tensor needs it."""
        self.set_bits(bits)
        self.measured.fill_(bits != self.placed_bits)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list, *args: object) -> None:
        """Take the saved width too, when this model could have it: the placed one, or wider by
        measurement. Another width comes from a model quantized with another config (a 16-bit
        model's state in an 8-bit one ran it at 16 bit, silently). A state_dict saved before
        widths were kept has none (the placed width stays)."""
        saved = state_dict.get(prefix + "width")
        measured = state_dict.get(prefix + "measured")
        if saved is not None and measured is not None and int(saved) != self.placed_bits and (
                int(saved) < self.placed_bits or not bool(measured)):
            raise LoadError(
                f"the state_dict holds a {int(saved)}-bit quantizer '{prefix.rstrip('.')}' where "
                f"this model places {self.placed_bits} bit: it comes from a model quantized "
                "with other bit widths. Prepare with the same QuantConfig (activation_bits, "
                "weight_bits, sixteen_bit_layers) before loading.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      *args)
        for key in ("width", "measured"):
            if prefix + key in missing_keys:
                missing_keys.remove(prefix + key)
        self.set_bits(int(self.width))

    @property
    def scale(self) -> float:
        """The power-of-2 scale of a per-tensor quantizer."""
        return float(scale_of(self.exponent))

    def kind(self) -> str:
        """"int8", "uint16", ..."""
        return f"{'int' if self.signed else 'uint'}{self.bits}"


class FrozenQuantizer(Quantizer):
    """A converted activation quantizer: round half to even at scale 2**exponent, saturate."""

    def __init__(self, exponent: float, bits: int, signed: bool) -> None:
        super().__init__(bits, signed)
        self.exponent.fill_(float(exponent))

    def extra_repr(self) -> str:
        return f"{self.kind()}, scale=2**{int(self.exponent)}"

    def forward(self, x: Tensor) -> Tensor:
        check_quantizer_input(x, self.exponent)
        return fake_quantize(x, self.exponent, self.qmin, self.qmax)


class CalibrationQuantizer(Quantizer):
    """An observer plus a quantizer; every piece of state in buffers (state_dict round-trips)."""

    def __init__(
        self, observer: Observer, bits: int, signed: bool, axis: int | None = None
    ) -> None:
        super().__init__(bits, signed, axis, tuple(observer.min_val.shape))
        self.observer = observer
        self.register_buffer("observer_enabled", torch.tensor(True))
        self.register_buffer("quant_enabled", torch.tensor(False))

    def extra_repr(self) -> str:
        return self.kind() + ("" if self.axis is None else f", axis={self.axis}")

    @property
    def observed(self) -> bool:
        """True once the observer has seen at least one tensor."""
        return bool(self.observer.observed)

    def current_exponent(self) -> Tensor:
        """The exponent to convert with: fresh from the observer while it observes, else frozen."""
        if bool(self.observer_enabled) and self.observed:
            return self.compute_exponent()
        return self.exponent

    def compute_exponent(self) -> Tensor:
        """Store and return the observer's proposed exponent(s)."""
        self.exponent.copy_(self.observer.exponent(self.qmax))
        return self.exponent

    def forward(self, x: Tensor) -> Tensor:
        check_quantizer_input(x, self.exponent)
        if bool(self.observer_enabled):
            self.observer(x)
            if not bool(self.quant_enabled):
                return x
            self.compute_exponent()
        elif not bool(self.quant_enabled):
            return x
        return fake_quantize(x, self.exponent, self.qmin, self.qmax, self.axis)

    def set_mode(self, observe: bool, quantize: bool) -> None:
        """Switch observing and quantizing on or off."""
        self.observer_enabled.fill_(observe)
        self.quant_enabled.fill_(quantize)


def _reduce_min_max(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """Global min/max over all DDP ranks (identity when torch.distributed is not running)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return low, high
    pair = torch.stack([-low, high])
    dist.all_reduce(pair, op=dist.ReduceOp.MAX)
    return -pair[0], pair[1]


class WeightQuantizer(CalibrationQuantizer):
    """A conv/linear weight's quantizer, owning how its exponent is chosen (docs/design.md,
    "Where does a weight get its exponent?"). `rule` "observed" (PTC): calibration computes it
    from the observer (and may search it by output error); "calibrated" (QAT from a calibrated
    model): the exponent it holds; "minmax" / "mse" (QAT): recomputed from the current weight
    on every training forward (`quantfx.qmath.weight_exponent`)."""

    def __init__(self, observer: Observer, bits: int, axis: int | None = None,
                 rule: str = "observed") -> None:
        super().__init__(observer, bits, signed=True, axis=axis)
        self.rule = rule

    @property
    def follows_weight(self) -> bool:
        """Whether each training forward recomputes the exponent from the weight."""
        return self.rule not in ("observed", "calibrated")

    def exponent_for(self, weight: Tensor) -> Tensor:
        """The exponent(s) `weight` gets now (before a bias fit may raise them)."""
        if not self.follows_weight:
            return self.exponent.clone()
        return weight_exponent(weight, self.qmax, self.axis, self.rule)


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


class QuantizerFactory:
    """Builds every quantizer of a prepared model, of the kind its back end needs.

    PTC (`qat=False`): activations get the config's observer (histogram by default), weights
    the config's weight observer, per channel for depthwise convs when the config says so. QAT:
    activations get a `QATQuantizer`; weights a quantizer that rounds on every forward at the
    exponent the layer derives from its current (BN-folded) weight.
    """

    def __init__(self, config: QuantConfig, qat: bool = False) -> None:
        self.config = config
        self.qat = qat

    def activation(self, bits: int, signed: bool, learnable: bool = True) -> CalibrationQuantizer:
        """The quantizer of one activation tensor. Ranges "learned" learn only `learnable`
        ones: a tensor no gradient reaches (the model's input) would make the first layer
        compute an input gradient for its threshold alone, a whole extra backward pass."""
        config = self.config
        if self.qat:
            learned = config.schedule.ranges == "learned" and learnable
            kind = LearnedRangeQuantizer if learned else QATQuantizer
            return kind(bits, signed, config.moving_average_momentum)
        observer = make_observer(
            config.activation_observer,
            momentum=config.moving_average_momentum,
            bins=config.histogram_bins,
            search=config.range_search,
            percentile=config.percentile,
        )
        return CalibrationQuantizer(observer, bits, signed=signed)

    def per_channel(self, layer: nn.Module) -> bool:
        """Whether `layer`'s weight gets one scale per output channel."""
        conv = isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed
        return not isinstance(layer, BatchNormLayer) and (  # TIDL: BN per tensor
            (self.config.depthwise_per_channel and is_depthwise(layer))
            or (self.config.convs_per_channel and conv))

    def weight(self, layer: nn.Module, bits: int, rule: str | None = None) -> WeightQuantizer:
        """The quantizer of a conv/linear layer's weight; QAT's follows `rule` (default: the
        schedule's, "minmax" where that is "calibrated": nothing was calibrated)."""
        per_channel = self.per_channel(layer)
        axis = 0 if per_channel else None
        channels = layer.weight.shape[0] if per_channel else 1
        kind = "minmax" if self.qat else self.config.weight_observer
        if self.qat and rule is None:
            rule = self.config.schedule.weight_exponent
            rule = "minmax" if rule == "calibrated" else rule
        quantizer = WeightQuantizer(make_observer(kind, axis=axis, channels=channels), bits,
                                    axis=axis, rule=rule or "observed")
        if self.qat:
            quantizer.set_mode(observe=False, quantize=True)
        return quantizer

    def slope(self, bits: int) -> CalibrationQuantizer:
        """The quantizer of a PReLU's slopes: per tensor, never clipping (the scale TIDL would
        derive from the slopes itself); in QAT it follows the slopes as they train."""
        quantizer = CalibrationQuantizer(make_observer("minmax"), bits, signed=True)
        if self.qat:
            quantizer.set_mode(observe=True, quantize=True)
        return quantizer


def calibration_quantizers(model: nn.Module) -> list[tuple[str, CalibrationQuantizer]]:
    """Every observing quantizer of `model` (activations and weights), with its name."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, CalibrationQuantizer)]


def set_quant_mode(model: nn.Module, observe: bool, quantize: bool) -> None:
    """Switch observing / quantizing for every observing quantizer of `model`."""
    for _, quantizer in calibration_quantizers(model):
        quantizer.set_mode(observe, quantize)


@contextlib.contextmanager
def quant_mode(model: nn.Module, observe: bool, quantize: bool) -> Iterator[None]:
    """Every observing quantizer of `model` observing / quantizing as asked inside the block,
    and back to the mode each had before it afterwards, error or not."""
    saved = [(quantizer, bool(quantizer.observer_enabled), bool(quantizer.quant_enabled))
             for _, quantizer in calibration_quantizers(model)]
    set_quant_mode(model, observe, quantize)
    try:
        yield
    finally:
        for quantizer, observing, quantizing in saved:
            quantizer.set_mode(observing, quantizing)


def named_non_finite(model: nn.Module, error: NonFiniteError) -> NonFiniteError:
    """`error` with the name of the tensor whose observer raised it, as `analyze` names
    tensors (a layer's weight as `layer.weight`)."""
    for name, quantizer in calibration_quantizers(model):
        if quantizer.observer is error.source:
            path = [part for part in name.split(".") if part != "quantizers"]
            tensor = ".".join(path).removesuffix("_quantizer")
            return NonFiniteError(error.source, tensor)
    return error
