"""`QuantConfig` and `QATSchedule`: every knob in one place, validated, with defaults that work."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from quantfx.checks import (
    as_tuple,
    check_bool,
    check_choice,
    check_int,
    check_keywords,
    check_number,
)
from quantfx.errors import ConfigError
from quantfx.tidl.profiles import PROFILES, TARGETS, DeviceProfile, resolve_target

SUPPORTED_BITS = (8, 16)
ACTIVATION_OBSERVERS = ("minmax", "moving_average", "histogram")
WEIGHT_OBSERVERS = ("minmax", "mse")
QAT_WEIGHT_EXPONENTS = (*WEIGHT_OBSERVERS, "calibrated", "learned")
"""`QATSchedule.weight_exponent`: the per-step rules, the exponent calibration chose, or a
learned threshold (TQT)."""
QAT_RANGES = ("calibrated", "statistics", "learned")
"""`QATSchedule.ranges`: calibration's (kept), running statistics (PACT2) or learned log2
thresholds (TQT)."""
LAYER_ALIASES = ("first", "last", "heads")
RANGE_SEARCHES = ("mse", "percentile", "none")
WEIGHT_ROUNDINGS = ("nearest", "learned", "error_feedback")
AUTO_PARTS = "auto"
"""`QuantConfig(quantize_only="auto")`: quantize the largest submodules that trace."""
GRAPH = {"graph": True}
"""Field metadata of the `QuantConfig` fields that decide the prepared graph: where quantizers
go, how wide (`GRAPH_FIELDS`)."""


def _checked_keywords(cls: type) -> type:
    """Make an unknown or surplus argument of the dataclass `cls` a `ConfigError`."""
    init = cls.__init__
    names = [item.name for item in fields(cls)]

    @functools.wraps(init)
    def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
        check_keywords(kwargs, names, cls.__name__)
        if len(args) > len(names):
            raise ConfigError(f"{cls.__name__} takes at most {len(names)} positional "
                              f"arguments, got {len(args)}; name the options instead.")
        init(self, *args, **kwargs)

    cls.__init__ = checked_init
    return cls


@_checked_keywords
@dataclass
class QATSchedule:
    """When QAT freezes BatchNorm statistics and then quantizer ranges, plus its weight clipping.

    Steps count train-mode forwards of the prepared model (automatic); epochs count calls of
    `end_qat_epoch(model)` (once at the end of each epoch). N means "after N": with
    ``freeze_bn_step=100`` BN statistics update in steps 1..100 and are frozen from step 101;
    with ``freeze_bn_epoch=2`` they update in epochs 1 and 2 and are frozen from epoch 3.
    None never freezes by that counter; 0 freezes at once.
    """

    freeze_bn_step: int | None = None
    """Train-mode forwards after which BN uses (and stops updating) its running statistics."""
    freeze_ranges_step: int | None = None
    """Train-mode forwards after which activation ranges stop updating."""
    freeze_bn_epoch: int | None = None
    """Epochs (calls of `end_qat_epoch`) after which BN statistics freeze."""
    freeze_ranges_epoch: int | None = None
    """Epochs after which activation ranges freeze."""
    weight_clip_std: float | None = 12.0
    """One-time clip at `prepare_qat` of BN-folded weights beyond this many standard deviations
    of their tensor (or channel when per-channel) that are that far from their own output
    channel's spread too (`quantfx.qat.layer.MIN_CHANNEL_WEIGHTS`): tames single outliers that
    would waste most of a power-of-2 per-tensor range. 12, not 4: real pretrained weights have
    heavy tails (EfficientNet-Lite1 on TDA4VM, QAT started from calibration, before any step:
    10.7 dB with no clip, 10.6 at 12, 10.1 at 8, 5.9 at 4; PTC gives 11.8); the Fashion-MNIST
    nets of the benchmarks have no weight beyond 4. None disables it."""

    weight_exponent: str = "calibrated"
    """How QAT picks a weight's exponent: "calibrated" (QAT from a calibrated `quantfx.prepare`
    model keeps each exponent calibration chose, so training starts exactly where calibration
    ended; from a float model it is "minmax"), "minmax" (each step's never-clipping exponent),
    "mse" (PTC's least-error search, every step) or "learned" (TQT: a log2 threshold per
    weight, or per channel, trained with the model from calibration's exponent, or the first
    weight's never-clipping one; `LearnedWeightQuantizer`). Per-step exponents undo calibration:
    EfficientNet-Lite1 on TDA4VM started at 12.7 dB instead of PTC's 16.7 and one optimizer
    step of 1e-6 took it to -4.9 dB (weights rounded onto their grid's edge moved a power of 2
    up). From float, calibrated mobilenetv2_style, 1 epoch: minmax 91.26 / 91.24 %, mse
    91.20 / 91.20 % (per-channel / per-tensor depthwise; PTC 91.20 / 91.19 %)."""

    ranges: str = "calibrated"
    """How QAT sets activation ranges: "calibrated" (QAT from a calibrated `quantfx.prepare`
    model keeps each range calibration chose, as "calibrated" weights keep theirs; a range
    calibration did not observe, and every range of QAT from a float model, follows
    "statistics"), "statistics" (a moving average of each batch's min/max, rounded up to a
    power of 2: PACT2's statistical half; from a calibrated model it starts at calibration's
    range, and the min/max of the batches soon replace calibration's searched clipping) or
    "learned" (TQT: a log2 threshold per tensor trained with the model from calibration's
    start; `LearnedRangeQuantizer`; the model's inputs, which no gradient reaches, keep
    calibration's range, or statistics from float). The YOLOv8-style detector, one QAT
    epoch from its calibrated model: statistics 1.10 mAP points below float, calibrated
    ranges 0.17 above."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` on any invalid field (run again wherever the schedule is used)."""
        check_choice(self.weight_exponent, "QATSchedule.weight_exponent", QAT_WEIGHT_EXPONENTS)
        check_choice(self.ranges, "QATSchedule.ranges", QAT_RANGES)
        for name in ("freeze_bn_step", "freeze_ranges_step", "freeze_bn_epoch",
                     "freeze_ranges_epoch"):
            value = getattr(self, name)
            if value is not None:
                check_int(value, f"QATSchedule.{name}", 0, example=f"{name}=2000, or None")
        if self.weight_clip_std is not None:
            check_number(self.weight_clip_std, "QATSchedule.weight_clip_std", 1.0, low_open=True,
                         example="4.0, or None to keep every weight")


@_checked_keywords
@dataclass
class QuantConfig:
    """Every quantization choice in one place.

    Defaults follow TIDL's fixed-point format (power-of-2, symmetric, per-tensor, 8 bit) with
    per-channel weights for depthwise convolutions and histogram-searched activation ranges.
    """

    target: str = field(default="generic", metadata=GRAPH)
    """The device the model is for: "generic" (any QDQ runtime), "tda4vm", "am62a", "am67a",
    "am68a" or "am69a". It sets what the device needs (quantfx.tidl.profiles): bias width,
    per-channel rules, the export's options file and the TIDL checker's rules."""
    activation_bits: int = field(default=8, metadata=GRAPH)
    """Bits of every activation quantizer (8 or 16)."""
    weight_bits: int = field(default=8, metadata=GRAPH)
    """Bits of every weight quantizer (8 or 16)."""
    per_channel_depthwise: bool | None = field(default=None, metadata=GRAPH)
    """Give each output channel of a depthwise convolution its own power-of-2 weight scale;
    None: the target's default (True, except on "tda4vm", which runs per-tensor weights)."""
    per_channel_weights: bool | None = field(default=None, metadata=GRAPH)
    """Give each output channel of *every* convolution (not transposed) its own power-of-2
    weight scale; None: the target's default (on for the AM6xA SoCs, off for "generic" and
    "tda4vm")."""
    activation_observer: str = "histogram"
    """Range estimator for activations: "minmax", "moving_average" or "histogram"."""
    equalization: bool | None = None
    """Cross-layer equalization before PTC (`quantfx.passes.equalize`): rescale consecutive
    layers' channels (through ReLU) so their weight ranges match, and move biases it makes large
    into the next layer; the float function is unchanged. None: on when depthwise weights are
    per tensor (`per_channel_depthwise` off, e.g. on TDA4VM), where one scale must fit every
    channel."""
    align_bounded_activations: bool = field(default=True, metadata=GRAPH)
    """PTC: where a ReLU6 (any `Hardtanh(0, M)`) lies between two layers, scale the layer
    before it up and the layer after it down so the bound lands on the top of its power-of-2
    grid (6 -> 7.97 at 8 bit: otherwise a quarter of the codes go unused), the float function
    unchanged (`quantfx.passes.grid_alignment`; the file then holds a Clip at the new bound)."""
    weight_observer: str = "mse"
    """Weight exponent choice: "minmax" (never clip) or "mse" (the exponent, among the
    never-clipping one and up to four below it, with the least squared weight error: clipping
    rare outlier weights when that halves the step for all the others). QAT from a calibrated
    model keeps the exponents it chose (`QATSchedule.weight_exponent`)."""
    weight_rounding: str | None = None
    """How PTC rounds weights onto their grid: "nearest"; "learned" (AdaRound-style: each
    weight rounds up or down as the layer's output error on the calibration data decides,
    layer by layer; `quantfx.ptc.learned_rounding`; costs a few seconds per layer); or
    "error_feedback" (GPTQ-style: each weight column's rounding error is spread over the
    columns not yet rounded, weighted by the layer input's second moments, from weights first
    corrected for the error the layers above left in that input; `quantfx.ptc.error_feedback`;
    about 2.5x a plain calibration).
    None: "error_feedback" (on every real model of `python -m benchmarks real_models` it beat
    round-to-nearest on every target)."""
    widen_coarse_weights: bool = field(default=True, metadata=GRAPH)
    """PTC: give 16-bit weights (activations stay 8 bit; TIDL's `params_16bit_names_list`) to
    the layers whose one 8-bit per-tensor weight grid leaves a quarter or more of their output
    channels with fewer than 8 codes -- typically a BN-folded stem whose channel ranges span
    20x -- the coarsest tenth of the layers at most (`quantfx.passes.place`). Decided from the
    weights at `prepare`; per-channel weights are never coarse."""
    widen_sensitive_layers: bool = True
    """PTC, 8 bit: after the ranges, measure each layer's own 8-bit rounding (its weights and
    output, nothing else quantized) at each model output on 8 calibration samples, and give
    16-bit weights and a 16-bit output (on TDA4VM, whose 8-bit layers keep 16-bit biases, the
    weights only) to the layers that alone hold an output below 30 dB SQNR, the worst first,
    a tenth of the layers at most, and besides that tenth to the layers that produce a model
    output and hold it below 45 dB (one of several outputs; a lone output on the "generic"
    target, whose runtimes take 16-bit Q/DQ: TIDL's pre-quantized import is 8 bit)
    (`quantfx.ptc.mixed_precision`; the export verifies such files step by step,
    `quantfx.export.stepwise`; 16-bit Q/DQ need opset 21, the export's default then). The
    choice is in the calibration check (`summary()`) and the state_dict. Costs a forward of 8
    samples per group measured (layers are measured in halving groups: few forwards when few
    layers are sensitive)."""
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
    ranges do. Weight rounding (the default error feedback) corrects the biases in its own
    pass, on at most its 256 samples."""
    sixteen_bit_layers: Sequence[str] = field(default_factory=tuple, metadata=GRAPH)
    """Layers kept at 16 bit: conv/linear layers (weights and output) by module path or graph
    node name, "first" / "last" (TI's advice for regression-style networks), "heads" (every
    conv/linear whose output reaches a model output without passing another one: a
    detector's box/objectness/class convs), or any other tensor by its graph node name as
    `quantfx.analyze` reports it (e.g. "add_3": its output). With `quantize_only`, full module
    paths ("backbone.0"); "first" / "last" then mean the first part's first and the last
    part's last layer."""
    nonnegative_inputs: bool = field(default=False, metadata=GRAPH)
    """Quantize the network inputs unsigned (e.g. images in [0, 1] that were not normalized)."""
    leaf_modules: Sequence[type[nn.Module] | str] = field(default_factory=tuple,
                                                          metadata=GRAPH)
    """Module classes or qualified names (e.g. "backbone.decoder") the tracer must not enter."""
    autowrap_functions: Sequence[Callable] = field(default_factory=tuple, metadata=GRAPH)
    """Functions traced as single calls, like those decorated with `@torch.fx.wrap`."""
    quantize_only: Sequence[str] | str = field(default_factory=tuple, metadata=GRAPH)
    """Quantize only these submodules (qualified names such as "backbone", "head"), each its
    own quantized part; the rest of the model runs in float (`quantfx.partial`). "auto": the
    largest submodules that trace, for models that do not trace whole (detectors). Empty: the
    whole model."""
    progress: bool = True
    """Show progress bars on long loops (calibration)."""
    qat_schedule: QATSchedule | None = None
    """When QAT freezes BN statistics, then ranges; None: `QATSchedule()`'s defaults."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def profile(self) -> DeviceProfile:
        """What the target device needs (`quantfx.tidl.profiles`)."""
        return PROFILES[self.target]

    @property
    def rounding(self) -> str:
        """How PTC rounds weights (resolved): error feedback unless set; on the generic
        target's grids it took EfficientNet-Lite1 from 20.5 to 21.8 dB, Lite2 from 21.2 to
        22.2 and the Keras-style CNN from 32.7 to 35.3, for about twice the calibration time
        (docs/ptc.md)."""
        return "error_feedback" if self.weight_rounding is None else self.weight_rounding

    @property
    def depthwise_per_channel(self) -> bool:
        """Whether depthwise convolutions get per-channel weight scales (resolved)."""
        if self.per_channel_depthwise is None:
            return self.profile.per_channel_depthwise
        return self.per_channel_depthwise

    @property
    def equalizes(self) -> bool:
        """Whether PTC applies cross-layer equalization (resolved)."""
        if self.equalization is None:
            return not self.depthwise_per_channel
        return self.equalization

    @property
    def convs_per_channel(self) -> bool:
        """Whether every conv gets per-channel weight scales (resolved)."""
        if self.per_channel_weights is None:
            return self.profile.per_channel_convs
        return self.per_channel_weights

    @property
    def schedule(self) -> QATSchedule:
        """The QAT schedule to use: `qat_schedule`, or the defaults."""
        return self.qat_schedule if self.qat_schedule is not None else QATSchedule()

    def validate(self) -> None:
        """Raise `ConfigError` on any invalid field; every public function calls it again, so
        a field changed after construction is checked where it is used."""
        for name in ("activation_bits", "weight_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value not in SUPPORTED_BITS:
                raise ConfigError(
                    f"QuantConfig.{name}={value!r} is not supported: TIDL-class engines run 8 or "
                    f"16 bit fixed point. Use one of {SUPPORTED_BITS} (an int)."
                )
        self.target = check_choice(resolve_target(self.target), "QuantConfig.target", TARGETS)
        if self.equalization is not None:
            check_bool(self.equalization, "QuantConfig.equalization")
        for name in ("align_bounded_activations", "bias_calibration", "nonnegative_inputs",
                     "progress", "widen_coarse_weights", "widen_sensitive_layers"):
            check_bool(getattr(self, name), f"QuantConfig.{name}")
        for name in ("per_channel_depthwise", "per_channel_weights"):
            value = getattr(self, name)
            if value is None:
                continue
            check_bool(value, f"QuantConfig.{name}")
            if value and not self.profile.per_channel_weights:
                raise ConfigError(
                    f"QuantConfig(target={self.target!r}) runs per-tensor weights only "
                    f"({self.profile.description}); use {name}=False or None.")
        check_choice(self.activation_observer, "QuantConfig.activation_observer",
                     ACTIVATION_OBSERVERS)
        check_choice(self.weight_observer, "QuantConfig.weight_observer", WEIGHT_OBSERVERS)
        check_choice(self.range_search, "QuantConfig.range_search", RANGE_SEARCHES)
        if self.weight_rounding is not None:
            check_choice(self.weight_rounding, "QuantConfig.weight_rounding", WEIGHT_ROUNDINGS)
        check_number(self.percentile, "QuantConfig.percentile", 50.0, 100.0, low_open=True,
                     example="99.99")
        bins = self.histogram_bins
        check_int(bins, "QuantConfig.histogram_bins", 64, example="2048")
        if bins & (bins - 1):
            raise ConfigError(
                f"QuantConfig.histogram_bins={bins!r} must be a power of two >= 64 (e.g. 2048)."
            )
        check_number(self.moving_average_momentum, "QuantConfig.moving_average_momentum", 0.0,
                     1.0, low_open=True, example="0.1")
        check_int(self.bias_calibration_samples, "QuantConfig.bias_calibration_samples", 1,
                  example="512")
        self._validate_sequences()
        if self.qat_schedule is not None:
            if not isinstance(self.qat_schedule, QATSchedule):
                raise ConfigError(
                    f"QuantConfig.qat_schedule must be a quantfx.QATSchedule or None, got "
                    f"{type(self.qat_schedule).__name__}."
                )
            self.qat_schedule.validate()

    def _validate_sequences(self) -> None:
        """Check the list-valued fields and store them as tuples."""
        self.leaf_modules = as_tuple(
            self.leaf_modules, "QuantConfig.leaf_modules",
            lambda item: isinstance(item, str) or (isinstance(item, type)
                                                   and issubclass(item, nn.Module)),
            "nn.Module subclasses or qualified module names such as 'backbone.head'")
        self.sixteen_bit_layers = as_tuple(
            self.sixteen_bit_layers, "QuantConfig.sixteen_bit_layers",
            lambda item: isinstance(item, str),
            "layer names such as 'features.0.0' or the aliases 'first' / 'last' / 'heads'")
        if self.quantize_only != AUTO_PARTS:
            self.quantize_only = as_tuple(
                self.quantize_only, "QuantConfig.quantize_only",
                lambda item: isinstance(item, str) and item not in ("", AUTO_PARTS),
                "submodule names such as 'backbone' (or quantize_only='auto')")
        self.autowrap_functions = as_tuple(
            self.autowrap_functions, "QuantConfig.autowrap_functions",
            lambda item: callable(item) and not isinstance(item, type),
            "functions (to be traced as single calls, like @torch.fx.wrap ones)")


GRAPH_FIELDS = tuple(item.name for item in fields(QuantConfig) if item.metadata.get("graph"))
"""The `QuantConfig` fields that decide the prepared graph (marked `GRAPH` in the class): a
config given to `prepare_qat` for a calibrated model must agree with its own on these."""


def resolve_config(config: QuantConfig | None) -> QuantConfig:
    """The config a public function works with: the given one (checked again), or the defaults."""
    if config is None:
        return QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a quantfx.QuantConfig, got {type(config).__name__}.")
    config.validate()
    return dataclasses.replace(config)  # a copy: changing the user's object later changes nothing
