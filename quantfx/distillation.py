"""`distill`: quantization-aware training without labels, the float model as the teacher.

The student is the QAT model (`prepare_qat` from a calibrated model: it starts exactly where
calibration ended), the teacher its float self; unlabeled batches go through both and the
student learns to match the teacher's outputs and, optionally, every quantized activation
(normalized mean squared errors: the loss is what output SQNR measures). Adam moves each
weight in units of its own quantization step (`LEARNING_RATE` steps of 2**exponent), so one
rate fits layers whose scales differ by a thousand; biases and other parameters move by a
small share of their own magnitude. Warm-up, then a cosine decay over the budget (steps or
minutes). Under `torch.distributed` the ranks average gradients and stop together.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantfx.checks import check_bool, check_int, check_number
from quantfx.config import QuantConfig
from quantfx.distillation_state import (
    JUDGE_EVERY,
    HeldOut,
    check_checkpoint_path,
    load_checkpoint,
    output_tensors,
    relative_error,
    save_checkpoint,
)
from quantfx.distributed import shows_progress, world_size
from quantfx.errors import CalibrationError, ConfigError
from quantfx.learned_rounding import restore_float_parameters
from quantfx.ptc import calibrate, iterate_batches, prepare
from quantfx.qat import QATLayer, freeze_batchnorm, freeze_ranges, prepare_qat
from quantfx.quantizers import QATQuantizer, set_quant_mode
from quantfx.state import FLOAT, PREPARED, PTC, QAT, require_state, state_of

DEFAULT_STEPS = 200
"""Optimizer steps when neither `steps` nor `minutes` is given."""
LEARNING_RATE = 0.01
"""Adam's step for a weight, in its quantization steps (2**exponent) (measured on
EfficientNet-Lite1, TDA4VM: 0.01 and 0.03 alike, 0.1 and more lose to calibration)."""
OTHER_SHARE = 0.1
"""Adam's step for biases and other parameters, as a share of LEARNING_RATE times the
parameter's root mean square (biases that grow can force a coarser weight scale on engines
with 16-bit biases: measured 3x larger lost 7 dB)."""
WARMUP_STEPS = 10
"""Linear warm-up: Adam's first steps move every weight by the full rate at once."""
CHECKPOINT_EVERY = 50
"""Steps between checkpoints (and at the end)."""

_log = logging.getLogger(__name__)


def distill(model: nn.Module, data: Iterable | str | os.PathLike, *,
            steps: int | None = None, minutes: float | None = None,
            example_inputs: Any = None, config: QuantConfig | None = None,
            features: bool = True, learning_rate: float = LEARNING_RATE,
            checkpoint: str | os.PathLike | None = None) -> fx.GraphModule:
    """Quantization-aware training without labels: the float model teaches its quantized self.

    `model`: a float model (prepared with `config` and calibrated on `data` first), a model
    returned by `quantfx.prepare` (calibrated on `data` unless it is already), or one returned
    by `prepare_qat` (its float self at the start is the teacher). `data`: batches of inputs
    (labels are ignored), used again and again, or an image folder (`load_calibration`).
    Budget: `steps` optimizer steps or `minutes` of training, whichever ends first (default
    `DEFAULT_STEPS`). `checkpoint`: a file written every `CHECKPOINT_EVERY` steps; an existing
    one is resumed. Returns the trained QAT model in eval mode, ready for `quantfx.convert`.
    """
    budget = _check_options(steps, minutes, features, learning_rate, checkpoint)
    if checkpoint is not None:
        check_checkpoint_path(os.fspath(checkpoint))
    batches = _batches(data)
    student, teacher = _student_and_teacher(model, batches, example_inputs, config)
    held_out = HeldOut(student, teacher, next(_cycle(student, batches, 0, False)))
    trainer = _Trainer(student, teacher, features, learning_rate, held_out)
    start = 0
    if checkpoint is not None:
        start = load_checkpoint(os.fspath(checkpoint), student, trainer.optimizer, held_out)
    hold_first = _batch_count(batches) != 1
    trainer.run(_cycle(student, batches, start, hold_first), start, budget, checkpoint)
    held_out.restore_best(student)
    _log.info("distill: held-out output SQNR %.2f dB at the start, %.2f dB at step %d (kept)",
              _db(held_out.first_error), _db(held_out.best_error), held_out.best_step)
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
    return (steps if steps is not None else 2**62,
            60.0 * minutes if minutes is not None else math.inf)


def _batches(data: Any) -> Any:
    """`data` as something iterated once per pass: an image folder is read into batches."""
    if isinstance(data, (str, os.PathLike)):
        from quantfx.sources import load_calibration

        return load_calibration(data)
    if isinstance(data, Iterator):
        raise CalibrationError(
            f"distill uses its data again and again, but got a one-pass "
            f"{type(data).__name__}: give a list of batches or a DataLoader.")
    return data


def _student_and_teacher(model: nn.Module, batches: Any, example_inputs: Any,
                         config: QuantConfig | None) -> tuple[fx.GraphModule, nn.Module]:
    """The QAT student (BN and calibrated ranges frozen) and its float teacher."""
    state = require_state(model, "distill", ConfigError,
                          (FLOAT, (PTC, PREPARED), (QAT, PREPARED)),
                          "a float model or one returned by quantfx.prepare or prepare_qat")
    if state is not None and state.parts:
        raise ConfigError("distill does not take partly quantized models yet "
                          "(QuantConfig.quantize_only): distill the whole model.")
    if state is not None and state.backend == QAT:
        if config is not None:
            raise ConfigError("distill takes no config with a prepare_qat model: it keeps "
                              "the config that model was prepared with.")
        student = copy.deepcopy(model).train()
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
    student = prepare_qat(prepared, _example(batches, len(state_of(prepared).input_shapes)))
    freeze_batchnorm(student)
    if all(quantizer.observed for quantizer in _activation_quantizers(student)):
        freeze_ranges(student)
    teacher = copy.deepcopy(prepared).eval()
    restore_float_parameters(teacher)
    set_quant_mode(teacher, observe=False, quantize=False)
    return student, _frozen(teacher)


def _example(batches: Any, count: int) -> tuple[Tensor, ...]:
    """The first sample of the first batch, as the model's `count` inputs."""
    from quantfx.ptc import batch_inputs

    for batch in batches:
        if isinstance(batch, Tensor):
            batch = (batch,)
        return tuple(item[:1] for item in batch_inputs(batch, count, 0))
    raise CalibrationError("distill data is empty: give at least one batch of inputs.")


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
    from quantfx.quantizers import calibration_quantizers

    return [quantizer for name, quantizer in calibration_quantizers(model)
            if not name.endswith("weight_quantizer")]


def _frozen(teacher: nn.Module) -> nn.Module:
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def _cycle(model: fx.GraphModule, batches: Any, skip: int,
           hold_first: bool) -> Iterator[tuple[Tensor, ...]]:
    """The batches' inputs (checked, on the model's device), pass after pass: without each
    pass's first batch when `hold_first` (the held-out batch), the first `skip` left out (a
    resumed run sees what the uninterrupted one would have)."""
    while True:
        for index, inputs in iterate_batches(model, batches, None, "distill data", local=True):
            if hold_first and index == 0:
                continue
            if skip:
                skip -= 1
                continue
            yield inputs


def _batch_count(batches: Any) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


def _db(error: float) -> float:
    return -10.0 * math.log10(max(error, 1e-30))


class _Trainer:
    """The optimizer, the feature hooks and the training loop of one distillation."""

    def __init__(self, student: fx.GraphModule, teacher: nn.Module, features: bool,
                 learning_rate: float, held_out: HeldOut) -> None:
        self.student, self.teacher, self.held_out = student, teacher, held_out
        self.optimizer = torch.optim.Adam(_parameter_groups(student, learning_rate))
        self.features: dict[tuple[str, str], Tensor] = {}
        self.feature_names = _feature_names(student, teacher) if features else []
        for name in self.feature_names:
            student.get_submodule(name).register_forward_hook(self._keep("student", name))
            teacher.get_submodule(name).register_forward_hook(self._keep("teacher", name))
        self.progress = shows_progress(state_of(student).config).progress

    def _keep(self, side: str, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            self.features[side, name] = output
        return hook

    def loss(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """Output error plus the mean error of the quantized activations (both relative)."""
        with torch.no_grad():
            targets = output_tensors(self.teacher(*inputs))
        outputs = output_tensors(self.student(*inputs))
        loss = sum(relative_error(output, target.detach())
                   for output, target in zip(outputs, targets)) / max(1, len(outputs))
        if self.feature_names:
            loss = loss + sum(
                relative_error(self.features["student", name], self.features["teacher", name])
                for name in self.feature_names) / len(self.feature_names)
        self.features.clear()
        return loss

    def run(self, batches: Iterator[tuple[Tensor, ...]], start: int, budget: tuple[int, float],
            checkpoint: str | os.PathLike | None) -> None:
        """Train from step `start` until the budget ends (steps, or seconds from now)."""
        steps, seconds = budget
        began = time.monotonic()
        bar = tqdm(total=None if steps >= 2**62 else steps, initial=start, desc="distill",
                   unit="step", leave=False, disable=None if self.progress else True)
        step = start
        with bar:
            while True:
                progress = _agreed(max(step / steps, (time.monotonic() - began) / seconds))
                if progress >= 1.0:
                    break
                for group in self.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * _rate_factor(step, progress)
                self.student.train()
                loss = self.loss(next(batches))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                _average_gradients(self.student)
                self.optimizer.step()
                step += 1
                bar.update(1)
                bar.set_postfix(error_db=f"{_db(loss.item()):.1f}")
                self._after_step(step, checkpoint, final=False)
        self._after_step(step, checkpoint, final=True)

    def _after_step(self, step: int, checkpoint: str | os.PathLike | None, final: bool) -> None:
        """Judge the held-out error every `JUDGE_EVERY` steps, checkpoint every
        `CHECKPOINT_EVERY` (both at the end too)."""
        if (step % JUDGE_EVERY == 0) != final:
            self.held_out.judge(self.student, step)
        if checkpoint is not None and (step % CHECKPOINT_EVERY == 0) != final:
            save_checkpoint(os.fspath(checkpoint), self.student, self.optimizer, step,
                            self.held_out)


def _rate_factor(step: int, progress: float) -> float:
    """Linear warm-up over `WARMUP_STEPS`, then cosine decay with the budget's progress."""
    return min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _agreed(progress: float) -> float:
    """The budget's progress every rank uses (the furthest rank's): they stop together."""
    if world_size() == 1:
        return progress
    import torch.distributed as dist

    value = torch.tensor([min(progress, 1.0)], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def _average_gradients(model: nn.Module) -> None:
    """Under torch.distributed, every rank steps with the mean gradient of all ranks."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad.div_(world_size())


def _parameter_groups(student: nn.Module, learning_rate: float) -> list[dict[str, Any]]:
    """Adam groups: each QAT weight at `learning_rate` of its quantization steps, every other
    parameter at `OTHER_SHARE` of that relative to its own root mean square."""
    groups, weights = [], set()
    for layer in student.modules():
        if isinstance(layer, QATLayer):
            weight = layer.layer.weight
            with torch.no_grad():
                folded, _ = layer.folded_weight_bias()
                step = float(torch.exp2(layer.weight_exponent_of(folded).float().max()))
            groups.append({"params": [weight], "base_lr": learning_rate * step})
            weights.add(id(weight))
    for parameter in student.parameters():
        if id(parameter) not in weights:
            size = float(parameter.detach().float().pow(2).mean().sqrt().clamp(min=1e-8))
            groups.append({"params": [parameter],
                           "base_lr": learning_rate * OTHER_SHARE * size})
    for group in groups:
        group["params"][0].requires_grad_(True)
        group["lr"] = group["base_lr"]
    return groups


def _feature_names(student: nn.Module, teacher: nn.Module) -> list[str]:
    """The activation quantizers the student and the teacher both have, by module name."""
    names = dict(teacher.named_modules())
    return [name for name, module in student.named_modules()
            if isinstance(module, QATQuantizer) and name in names]
