"""`QuantConfig`: one dataclass holding every knob, with defaults that work without tuning."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from quantfx.errors import ConfigError

SUPPORTED_BITS = (8, 16)
ACTIVATION_OBSERVERS = ("minmax", "moving_average", "histogram")
WEIGHT_OBSERVERS = ("minmax", "mse")
LAYER_ALIASES = ("first", "last")
RANGE_SEARCHES = ("mse", "percentile", "none")


@dataclass
class QuantConfig:
    """Every quantization choice in one place.

    Defaults follow TIDL's fixed-point format (power-of-2, symmetric, per-tensor, 8 bit) with
    per-channel weights for depthwise convolutions and histogram-searched activation ranges.
    """

    activation_bits: int = 8
    """Bits of every activation quantizer (8 or 16)."""
    weight_bits: int = 8
    """Bits of every weight quantizer (8 or 16)."""
    per_channel_depthwise: bool = True
    """Give each output channel of a depthwise convolution its own power-of-2 weight scale."""
    activation_observer: str = "histogram"
    """Range estimator for activations: "minmax", "moving_average" or "histogram"."""
    weight_observer: str = "mse"
    """Weight exponent choice: "minmax" (never clip) or "mse" (the exponent, among the
    never-clipping one and up to four below it, with the least squared weight error: clipping
    rare outlier weights when that halves the step for all the others). PTC only: QAT always
    uses the never-clipping exponent of the current weights (training shapes them)."""
    range_search: str = "mse"
    """How a histogram observer picks the exponent: "mse" (least squared error over candidate
    exponents), "percentile" (cover `percentile` % of values) or "none" (never clip)."""
    percentile: float = 99.99
    """Share of values (in %) a "percentile" search keeps unclipped."""
    histogram_bins: int = 2048
    """Bins of a histogram observer (a power of two, so range doublings merge bins exactly)."""
    moving_average_momentum: float = 0.1
    """Weight of the newest batch in a "moving_average" observer."""
    bias_calibration: bool = True
    """After ranges are set, shift each layer's bias so the mean of its quantized output
    matches the float output's mean per channel (layer by layer, in graph order)."""
    bias_calibration_samples: int = 512
    """How many calibration samples (from the first batches) bias calibration keeps and runs
    through the model (about two quantized passes); per-channel means settle long before
    ranges do."""
    sixteen_bit_layers: Sequence[str] = field(default_factory=tuple)
    """Layers kept at 16 bit (weights and outputs): module paths or graph node names of
    conv/linear layers, or "first" / "last" (TI's advice for regression-style networks)."""
    nonnegative_inputs: bool = False
    """Quantize the network inputs unsigned (e.g. images in [0, 1] that were not normalized)."""
    leaf_modules: Sequence[type[nn.Module] | str] = field(default_factory=tuple)
    """Module classes or qualified names (e.g. "backbone.decoder") the tracer must not enter."""
    autowrap_functions: Sequence[Callable] = field(default_factory=tuple)
    """Functions traced as single calls, like those decorated with `@torch.fx.wrap`."""
    progress: bool = True
    """Show progress bars on long loops (calibration)."""
    qat_schedule: Any = None
    """A `quantfx.QATSchedule` (when QAT freezes BN statistics, then ranges); None: defaults."""

    def __post_init__(self) -> None:
        for name in ("activation_bits", "weight_bits"):
            value = getattr(self, name)
            if value not in SUPPORTED_BITS:
                raise ConfigError(
                    f"QuantConfig.{name}={value!r} is not supported: TIDL-class engines run 8 or "
                    f"16 bit fixed point. Use one of {SUPPORTED_BITS}."
                )
        _check_choice("activation_observer", self.activation_observer, ACTIVATION_OBSERVERS)
        _check_choice("weight_observer", self.weight_observer, WEIGHT_OBSERVERS)
        _check_choice("range_search", self.range_search, RANGE_SEARCHES)
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(
                f"QuantConfig.percentile={self.percentile!r} must be in (50, 100], e.g. 99.99."
            )
        bins = self.histogram_bins
        if not isinstance(bins, int) or bins < 64 or bins & (bins - 1):
            raise ConfigError(
                f"QuantConfig.histogram_bins={bins!r} must be a power of two >= 64 (e.g. 2048)."
            )
        if not 0.0 < self.moving_average_momentum <= 1.0:
            raise ConfigError(
                f"QuantConfig.moving_average_momentum={self.moving_average_momentum!r} must be "
                "in (0, 1]."
            )
        self.leaf_modules = tuple(self.leaf_modules)
        for leaf in self.leaf_modules:
            if not (
                isinstance(leaf, str) or (isinstance(leaf, type) and issubclass(leaf, nn.Module))
            ):
                raise ConfigError(
                    f"QuantConfig.leaf_modules holds {leaf!r}: give nn.Module subclasses or "
                    "qualified module names such as 'backbone.head'."
                )
        if not isinstance(self.bias_calibration_samples, int) or self.bias_calibration_samples < 1:
            raise ConfigError(
                f"QuantConfig.bias_calibration_samples={self.bias_calibration_samples!r} must be "
                "a positive integer (e.g. 512)."
            )
        if isinstance(self.sixteen_bit_layers, str):
            self.sixteen_bit_layers = (self.sixteen_bit_layers,)
        self.sixteen_bit_layers = tuple(self.sixteen_bit_layers)
        for layer in self.sixteen_bit_layers:
            if not isinstance(layer, str):
                raise ConfigError(
                    f"QuantConfig.sixteen_bit_layers holds {layer!r}: give layer names such as "
                    "'features.0.0' or the aliases 'first' / 'last'."
                )
        self.autowrap_functions = tuple(self.autowrap_functions)
        for function in self.autowrap_functions:
            if not callable(function):
                raise ConfigError(
                    f"QuantConfig.autowrap_functions holds {function!r}, which is not callable."
                )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"QuantConfig.{name}={value!r} is not one of {choices}.")
