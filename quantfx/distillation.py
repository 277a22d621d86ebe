"""`distill`: quantization-aware training without labels, the float model as the teacher.

The student is the QAT model (`prepare_qat` from a calibrated model: it starts exactly where
calibration ended, BN folded, ranges frozen), the teacher its float self; unlabeled batches go
through both and the student learns to match the teacher (`quantfx.distillation_training`).
The first batch of the data is held out of training and judges the student every few steps;
the best state is returned (`quantfx.distillation_state`), never one worse there than the start.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from quantfx.checks import check_bool, check_int, check_number
from quantfx.config import QuantConfig
from quantfx.distillation_state import HeldOut, check_checkpoint_path, load_checkpoint
from quantfx.distillation_training import LEARNING_RATE, NO_STEP_LIMIT, Trainer, db
from quantfx.distributed import total_over_ranks, world_size
from quantfx.errors import CalibrationError, ConfigError, warn
from quantfx.frontend import as_input_tuple
from quantfx.inputs import check_input_tensors, parameter_dtype_device
from quantfx.partial import quantized_parts
from quantfx.ptc import batch_inputs, calibrate, iterate_batches, prepare
from quantfx.ptc.learned_rounding import restore_float_parameters
from quantfx.qat import freeze_batchnorm, freeze_ranges, prepare_qat
from quantfx.quantizers import calibration_quantizers, set_quant_mode
from quantfx.state import FLOAT, PREPARED, PTC, QAT, require_state, state_of

DEFAULT_STEPS = 200
"""Optimizer steps when neither `steps` nor `minutes` is given."""

_log = logging.getLogger(__name__)


def distill(model: nn.Module, data: Iterable | Tensor | str | os.PathLike, *,
            steps: int | None = None, minutes: float | None = None,
            example_inputs: Any = None, config: QuantConfig | None = None,
            features: bool = True, learning_rate: float = LEARNING_RATE,
            checkpoint: str | os.PathLike | None = None) -> fx.GraphModule:
    """Quantization-aware training without labels: the float model teaches its quantized self.

    `model`: a float model (prepared with `config` and calibrated on `data` first), a model
    returned by `quantfx.prepare` (calibrated on `data` unless it is already), or one returned
    by `prepare_qat` (its float self at the start is the teacher). `data`: batches of inputs
    (labels are ignored), used again and again, or an image folder (read at the model's input
    size, `_folder_batches`).
    Budget: `steps` optimizer steps or `minutes` of training, whichever ends first (default
    `DEFAULT_STEPS`). `checkpoint`: a file written every `CHECKPOINT_EVERY` steps; an existing
    one is resumed. Returns the trained QAT model in eval mode, ready for `quantfx.convert`.
    """
    budget = _check_options(steps, minutes, features, learning_rate, checkpoint)
    if checkpoint is not None:
        check_checkpoint_path(os.fspath(checkpoint))
    batches = _batches(data, model, example_inputs, config)
    _require_data_on_every_rank(batches)
    student, teacher = _student_and_teacher(model, batches, example_inputs, config)
    training = _Passes(student, batches)
    held_out = HeldOut(student, teacher, training.held_out)
    trainer = Trainer(student, teacher, features, learning_rate, held_out)
    try:
        start = 0 if checkpoint is None else load_checkpoint(os.fspath(checkpoint), trainer)
        trainer.run(training.inputs(skip=start), start, budget, checkpoint)
    finally:
        trainer.close()
    held_out.restore_best(student)
    _log.info("distill: held-out output SQNR %.2f dB at the start, %.2f dB at step %d (kept)",
              db(held_out.first_error), db(held_out.best_error), held_out.best_step)
    return student.eval()


def _check_options(steps: Any, minutes: Any, features: Any, learning_rate: Any,
                   checkpoint: Any) -> tuple[int, float]:
    """(steps, seconds) of the budget; `ConfigError` for any option of the wrong kind."""
    if steps is not None:
        check_int(steps, "distill steps", 1, example="200")
    if minutes is not None:
        check_number(minutes, "distill minutes", 0.0, low_open=True, example="5.0")
    check_bool(features, "distill features")
    check_number(learning_rate, "distill learning_rate", 0.0, low_open=True,
                 example=f"{LEARNING_RATE} (quantization steps per optimizer step)")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise ConfigError(f"distill checkpoint={checkpoint!r} must be a file path or None.")
    if steps is None and minutes is None:
        steps = DEFAULT_STEPS
    return (steps if steps is not None else NO_STEP_LIMIT,
            60.0 * minutes if minutes is not None else math.inf)


def _batches(data: Any, model: nn.Module, example_inputs: Any,
             config: QuantConfig | None) -> Any:
    """`data` as something iterated once per pass: an image folder is read into batches."""
    if isinstance(data, (str, os.PathLike)):
        return _folder_batches(os.fspath(data), model, example_inputs, config)
    if isinstance(data, Tensor):
        return [data]  # one batch, not a batch per row
    if isinstance(data, Iterator):
        raise CalibrationError(
            f"distill uses its data again and again, but got a one-pass "
            f"{type(data).__name__}: give a list of batches or a DataLoader.")
    if not isinstance(data, Iterable):
        raise CalibrationError(f"distill data must be batches (a list or a DataLoader) or an "
                               f"image folder, got {type(data).__name__}.")
    return data


def _folder_batches(folder: str, model: nn.Module, example_inputs: Any,
                    config: QuantConfig | None) -> list[Tensor]:
    """An image folder's batches at the model's input size (of `example_inputs`, else of the
    prepared model's inputs; 224 x 224 for a float model without them, with a warning),
    ImageNet-normalized as the command line's defaults do."""
    from quantfx.sources import ImageOptions, load_calibration

    state = state_of(model)
    shapes = ([tuple(tensor.shape) for tensor in as_input_tuple(example_inputs)]
              if example_inputs is not None else list(getattr(state, "input_shapes", [])))
    if not shapes:
        warn(f"distill reads the images of {folder!r} as 224 x 224 RGB crops, ImageNet-"
             "normalized (the command line's defaults): pass example_inputs of the model's "
             "input size, or batches preprocessed as the model expects.")
        options = ImageOptions()
    elif len(shapes) != 1 or len(shapes[0]) != 4 or shapes[0][1] not in (1, 3) or (
            shapes[0][2] != shapes[0][3]):
        raise ConfigError(
            f"distill reads an image folder as square RGB or grayscale images, but the model "
            f"takes inputs of shape(s) {shapes}: give distill batches of inputs instead.")
    else:
        side, gray = shapes[0][2], shapes[0][1] == 1
        options = ImageOptions(resize=round(side * 256 / 224), crop=side, grayscale=gray)
        if gray:  # ImageNet's statistics averaged over the colours
            options.mean, options.std = (sum(options.mean) / 3,), (sum(options.std) / 3,)
    progress = (config or getattr(state, "config", None) or QuantConfig()).progress
    return load_calibration(folder, images=options, progress=progress, what="distill")


def _student_and_teacher(model: nn.Module, batches: Any, example_inputs: Any,
                         config: QuantConfig | None) -> tuple[fx.GraphModule, nn.Module]:
    """The QAT student (BN frozen; calibrated ranges too, unless they are learned) and its
    float teacher."""
    state = require_state(model, "distill", ConfigError,
                          (FLOAT, (PTC, PREPARED), (QAT, PREPARED)),
                          "a float model or one returned by quantfx.prepare or prepare_qat")
    if quantized_parts(state):
        raise ConfigError("distill does not take partly quantized models yet "
                          "(QuantConfig.quantize_only): distill the whole model.")
    if state is not None and state.backend == QAT:
        if config is not None:
            raise ConfigError("distill takes no config with a prepare_qat model: it keeps "
                              "the config that model was prepared with.")
        _require_ranges(model)
        student = copy.deepcopy(model).train()
        freeze_batchnorm(student)  # unlabeled batches must not move BN statistics
        teacher = copy.deepcopy(model).eval()
        set_quant_mode(teacher, observe=False, quantize=False)
        return student, _frozen(teacher)
    if state is None:
        if example_inputs is None:
            example_inputs = _example(batches, 1)
        prepared = prepare(model, example_inputs, config)
        calibrate(prepared, batches)
    else:
        prepared = _calibrated_copy(model, state, batches, config)
    student = prepare_qat(prepared, _checked_example(batches, prepared))
    freeze_batchnorm(student)
    learned = state_of(student).config.schedule.ranges == "learned"
    if not learned and all(quantizer.observed for quantizer in _activation_quantizers(student)):
        freeze_ranges(student)  # statistics from unlabeled batches would only drift
    teacher = copy.deepcopy(prepared).eval()
    restore_float_parameters(teacher)
    set_quant_mode(teacher, observe=False, quantize=False)
    return student, _frozen(teacher)


def _require_ranges(model: nn.Module) -> None:
    """A QAT model from a float one has no ranges until it trains: in eval mode its
    quantizers pass values through, so its untrained start measured float-exact, beat every
    step and came back unchanged, and `convert` refused it."""
    unset = sum(not quantizer.observed for quantizer in _activation_quantizers(model))
    if unset:
        raise ConfigError(
            f"this prepare_qat model has {unset} activation range(s) it never measured (it "
            "has not trained yet): distill judges the quantized model from its first step. "
            "Give distill the float model (it prepares and calibrates it) or a calibrated "
            "quantfx.prepare model; or train the QAT model a few steps first.")


def _require_data_on_every_rank(batches: Any) -> None:
    """Under a process group every rank trains on its share: a rank without one is the same
    `CalibrationError` on every rank (raised on that rank alone, it left the others waiting in
    a collective, or dying with a gloo error)."""
    ranks = world_size()
    if ranks == 1:
        return
    holding = total_over_ranks(int(next(iter(batches), None) is not None))
    if holding < ranks:
        raise CalibrationError(f"{ranks - holding} of the {ranks} ranks have no distill data: "
                               "give every rank a share of the batches.")


def _example(batches: Any, count: int) -> tuple[Tensor, ...]:
    """The first sample of the first batch, as the model's `count` inputs."""
    for batch in batches:
        if isinstance(batch, Tensor):
            batch = (batch,)
        return tuple(item[:1] for item in batch_inputs(batch, count, 0, "distill"))
    raise CalibrationError("distill data is empty: give at least one batch of inputs.")


def _checked_example(batches: Any, prepared: fx.GraphModule) -> tuple[Tensor, ...]:
    """The data's first sample, checked against the inputs `prepared` was made for: the data
    is at fault, not an example_inputs the user never gave (prepare_qat said that)."""
    shapes = state_of(prepared).input_shapes
    example = _example(batches, len(shapes))
    dtype, _ = parameter_dtype_device(prepared)
    check_input_tensors(example, dtype, "distill data, input", CalibrationError)
    got, wanted = [tuple(t.shape[1:]) for t in example], [tuple(s[1:]) for s in shapes]
    if got != wanted:
        raise CalibrationError(
            f"distill data holds samples of shape(s) {got} but the model was prepared with "
            f"{wanted}: the student trains the prepared graph, made for that shape. Give "
            "batches of that shape (or distill the float model, prepared on them).")
    return example


def _calibrated_copy(model: fx.GraphModule, state: Any, batches: Any,
                     config: QuantConfig | None) -> fx.GraphModule:
    """A prepared model calibrated on `batches` unless it was already (the user's is kept)."""
    if config is not None:
        raise ConfigError("distill takes no config with a quantfx.prepare model: it keeps the "
                          "config that model was prepared with.")
    observed = [quantizer.observed for quantizer in _activation_quantizers(model)]
    if observed and all(observed) and not state.calibration_failed:
        return model
    prepared = copy.deepcopy(model)
    calibrate(prepared, batches)
    return prepared


def _activation_quantizers(model: nn.Module) -> list[nn.Module]:
    """The activation quantizers of a prepared or QAT model (weights' are inside layers)."""
    return [quantizer for name, quantizer in calibration_quantizers(model)
            if not name.endswith("weight_quantizer")]


def _frozen(teacher: nn.Module) -> nn.Module:
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


class _Passes:
    """The data's inputs (checked, on the model's device) pass after pass, the first batch of
    each pass held out (`held_out`: the first pass's) unless there is only one batch."""

    def __init__(self, model: fx.GraphModule, batches: Any) -> None:
        self.model, self.batches = model, batches
        first = iterate_batches(model, batches, None, "distill data", local=True,
                                what="distill")
        try:
            _, self.held_out = next(first)
        finally:
            first.close()  # a DataLoader's workers stop
        self.hold_first = True

    def inputs(self, skip: int) -> Iterator[tuple[Tensor, ...]]:
        """Training inputs forever, the first `skip` left out (a resumed run sees what the
        uninterrupted one would have)."""
        while True:
            trained = 0
            for index, inputs in iterate_batches(self.model, self.batches, None,
                                                 "distill data", local=True, what="distill"):
                if self.hold_first and index == 0:
                    continue
                trained += 1
                if skip:
                    skip -= 1
                    continue
                yield inputs
            if not trained:  # one batch: it trains and judges both
                self.hold_first = False
