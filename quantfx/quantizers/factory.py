"""`QuantizerFactory`: where every quantizer is made. Placement asks it for an activation or a
weight quantizer and it builds the PTC or the QAT kind from the `QuantConfig`."""

from __future__ import annotations

from torch import nn

from quantfx.config import QuantConfig
from quantfx.layers import BatchNormLayer, is_depthwise
from quantfx.observers import make_observer
from quantfx.quantizers.base import CalibrationQuantizer, WeightQuantizer
from quantfx.quantizers.training import (
    LearnedRangeQuantizer,
    LearnedWeightQuantizer,
    QATQuantizer,
)


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
        observer = make_observer(kind, axis=axis, channels=channels)
        if self.qat and rule == "learned":
            quantizer = LearnedWeightQuantizer(observer, bits, axis=axis)
        else:
            quantizer = WeightQuantizer(observer, bits, axis=axis, rule=rule or "observed")
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
