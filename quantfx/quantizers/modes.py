"""Every observing quantizer of a model at once: listed, switched (observe / quantize), switched
for one block and back, and named when its observer met a non-finite value; and the learned
log2 thresholds of a QAT model, for their own optimizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from quantfx.errors import ConfigError, NonFiniteError
from quantfx.quantizers.base import CalibrationQuantizer
from quantfx.quantizers.training import LearnedRangeQuantizer, LearnedWeightQuantizer


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


def learned_thresholds(model: nn.Module) -> list[nn.Parameter]:
    """The learned log2 thresholds of a QAT model (`QATSchedule` ranges / weight_exponent
    "learned"), for an optimizer of their own: TQT trains them with Adam; a fine-tuning SGD
    rate moves them by about 1e-7 octaves per step, which never changes an exponent. A
    `ConfigError` when there are none (an optimizer of nothing fails in torch)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"learned_thresholds needs a QAT model (torch.nn.Module), got "
                          f"{type(model).__name__}.")
    found = thresholds_in(model)
    if not found:
        raise ConfigError(
            "this model has no learned thresholds: prepare it with quantfx.prepare_qat and "
            "QuantConfig(qat_schedule=QATSchedule(ranges='learned')) (or weight_exponent="
            "'learned') to train them.")
    return found


def thresholds_in(module: nn.Module) -> list[nn.Parameter]:
    """The learned log2 thresholds under `module` (none is fine: the QAT controller asks)."""
    return [quantizer.log2_threshold for quantizer in module.modules()
            if isinstance(quantizer, (LearnedRangeQuantizer, LearnedWeightQuantizer))]
