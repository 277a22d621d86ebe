"""The seeds' first diagnostic as one call: is an accuracy loss due to 8-bit quantization?

"If 16-bit inference provides accuracy close to floating point and 8-bit has an accuracy
degradation, it is likely that the degradation is due to quantization. If 16-bit itself loses
substantially, the problem is something other than quantization."
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from quantfx.checks import check_number
from quantfx.config import QuantConfig, resolve_config
from quantfx.convert import convert
from quantfx.errors import ConfigError
from quantfx.ptc import calibrate, prepare
from quantfx.ptc.calibration_check import unlogged_calibrations
from quantfx.ranks import this_process_only
from quantfx.state import FLOAT, require_state


@dataclass(frozen=True)
class PrecisionReport:
    """Scores (higher is better) of the float, 8-bit and 16-bit models, and what they mean."""

    float_score: float
    int8_score: float
    int16_score: float
    tolerance: float
    verdict: str

    def __str__(self) -> str:
        rows = [("float", self.float_score), ("int8", self.int8_score), ("int16", self.int16_score)]
        table = "\n".join(f"{name:>6}  {score:10.4f}" for name, score in rows)
        return f"{table}\n{self.verdict}"


def _verdict(float_score: float, int8_score: float, int16_score: float, tolerance: float) -> str:
    loss8, loss16 = float_score - int8_score, float_score - int16_score
    if loss8 <= tolerance:
        return f"8-bit is within {tolerance:g} of float ({loss8:+.4g} loss): quantization is fine."
    if loss16 <= tolerance:
        return (
            f"16-bit is within {tolerance:g} of float but 8-bit loses {loss8:.4g}: the loss is "
            "quantization. Try 16-bit first/last layers (QuantConfig(sixteen_bit_layers=["
            "'first', 'last'])), more calibration data, or QAT (quantfx.prepare_qat)."
        )
    return (
        f"16-bit already loses {loss16:.4g}: the problem is not quantization. Check the "
        "preprocessing of the calibration/evaluation data and the model's traced graph."
    )


def _score(evaluate: Callable[[nn.Module], float], model: nn.Module, what: str) -> float:
    score = evaluate(model)
    one_number = isinstance(score, torch.Tensor) and score.numel() == 1
    if one_number or isinstance(score, (np.floating, np.integer)):
        score = score.item()  # a 0-d tensor or a numpy scalar is a number too
    try:
        return check_number(score, f"evaluate({what})")
    except ConfigError:
        raise ConfigError(f"evaluate returned {score!r} for {what}; it must return a finite "
                          "number (higher is better), e.g. top-1 accuracy in %.") from None


def compare_bit_depths(
    model: nn.Module,
    example_inputs: Any,
    calibration_data: Iterable,
    evaluate: Callable[[nn.Module], float],
    config: QuantConfig | None = None,
    tolerance: float = 1.0,
) -> PrecisionReport:
    """Calibrate `model` at 8 and at 16 bit and score both (and the float model) with `evaluate`.

    `evaluate(model) -> float` is the user's metric, higher is better (e.g. top-1 in %);
    `tolerance` is the loss, in the metric's units, still counted as "close to float".
    """
    if not callable(evaluate):
        raise ConfigError("evaluate must be a callable taking a model and returning a score.")
    check_number(tolerance, "tolerance", 0.0, example="1.0 (in the units of evaluate)")
    base = resolve_config(config)
    require_state(model, "compare_bit_depths", ConfigError, (FLOAT,),
                  "the float model (a torch.nn.Module)", "compare_bit_depths quantizes the "
                  "float model itself: give it the model you gave quantfx.prepare.")
    try:
        batches = list(calibration_data)
    except TypeError as error:
        raise ConfigError(f"calibration_data must be an iterable of batches, got "
                          f"{type(calibration_data).__name__}.") from error
    was_training = model.training
    try:
        float_score = _score(evaluate, model.eval(), "the float model")
    finally:
        model.train(was_training)  # the user's model is left as it was
    scores = []
    for bits in (8, 16):
        variant = replace(base, activation_bits=bits, weight_bits=bits, sixteen_bit_layers=())
        with this_process_only(), unlogged_calibrations():  # a measurement: nothing waits
            prepared = prepare(model, example_inputs, variant)  # for other ranks
            calibrate(prepared, batches)
        scores.append(_score(evaluate, convert(prepared), f"the {bits}-bit model"))
    int8_score, int16_score = scores
    verdict = _verdict(float_score, int8_score, int16_score, tolerance)
    return PrecisionReport(float_score, int8_score, int16_score, tolerance, verdict)
