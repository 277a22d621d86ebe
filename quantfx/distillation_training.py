"""The training loop of `quantfx.distill`: loss, optimizer, learning-rate schedule, budget.

The loss is the student's relative output error (mean squared error over the teacher's mean
square: what output SQNR measures) plus, with features, the same error at every quantized
activation, averaged. `StepScaledAdam` moves each weight in units of its own quantization
step (per channel where the weight is quantized per channel), so one rate fits layers whose
scales differ a thousandfold. Warm-up, then a cosine decay over the budget's progress (steps,
or seconds, whichever is further along). Under `torch.distributed` the ranks average their
gradients and agree on the progress, so they step alike and stop together.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantfx.distillation_state import (
    JUDGE_EVERY,
    HeldOut,
    output_tensors,
    relative_error,
    save_checkpoint,
)
from quantfx.distributed import average_gradients, max_over_ranks, shows_progress
from quantfx.qat import QATLayer
from quantfx.qmath import channel_shape
from quantfx.quantizers import LearnedRangeQuantizer, LearnedWeightQuantizer, QATQuantizer
from quantfx.state import state_of

LEARNING_RATE = 0.01
"""Adam's step for a weight, in its quantization steps (EfficientNet-Lite1, TDA4VM, 60 steps
from calibration's 16.7 dB: 0.01 and 0.03 alike, 18.3-18.8 dB)."""
OTHER_SHARE = 0.1
"""Adam's step for biases and other parameters, as a share of the learning rate times the
parameter's root mean square (EfficientNet-Lite1, TDA4VM, 60 steps: 30x larger fell from
18.6 dB to 9.7, below calibration's 16.7)."""
WARMUP_STEPS = 10
"""Linear warm-up: Adam's first steps move every weight by the full rate at once."""
CHECKPOINT_EVERY = 50
"""Steps between checkpoints (and at the end)."""
NO_STEP_LIMIT = 2**62


class StepScaledAdam(torch.optim.Optimizer):
    """Adam whose step for each element is `lr * scale`: `scale` (a group's tensor,
    broadcastable to its parameter) is the quantization step of each weight or channel."""

    def __init__(self, groups: list[dict[str, Any]], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        super().__init__(groups, {"lr": 0.0, "betas": betas, "eps": eps, "scale": 1.0})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: ARG002 - the Optimizer signature
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["mean"] = torch.zeros_like(parameter)
                    state["square"] = torch.zeros_like(parameter)
                state["step"] += 1
                count = float(state["step"])
                state["mean"].lerp_(parameter.grad, 1 - beta1)
                state["square"].mul_(beta2).addcmul_(parameter.grad, parameter.grad,
                                                     value=1 - beta2)
                denominator = (state["square"] / (1 - beta2**count)).sqrt_().add_(group["eps"])
                update = state["mean"] / (1 - beta1**count) / denominator
                parameter.sub_(update * (group["lr"] * group["scale"]))


def parameter_groups(student: nn.Module, learning_rate: float) -> list[dict[str, Any]]:
    """One group per parameter: QAT weights at `learning_rate` of their quantization steps,
    learned log2 thresholds at `learning_rate` octaves, biases and every other trainable
    parameter at `OTHER_SHARE` of it times their own root mean square. QAT layers' weights and
    biases train; other parameters only if they require gradients already."""
    groups, seen = [], set()
    for layer in student.modules():
        if not isinstance(layer, QATLayer):
            continue
        with torch.no_grad():
            folded, _ = layer.folded_weight_bias()
            exponent = layer.weight_exponent_of(folded).float()
        axis = layer.weight_quantizer.axis
        if axis is not None:
            exponent = exponent.reshape(channel_shape(folded.dim(), axis))
        groups.append({"params": [layer.layer.weight], "scale": torch.exp2(exponent)})
        seen.add(id(layer.layer.weight))
        if layer.layer.bias is not None:
            groups.append(_relative_group(layer.layer.bias))
            seen.add(id(layer.layer.bias))
    for quantizer in student.modules():
        if isinstance(quantizer, (LearnedRangeQuantizer, LearnedWeightQuantizer)):  # octaves
            groups.append({"params": [quantizer.log2_threshold], "scale": 1.0})
            seen.add(id(quantizer.log2_threshold))
    for parameter in student.parameters():
        if id(parameter) not in seen and parameter.requires_grad:
            groups.append(_relative_group(parameter))
    for group in groups:
        group["params"][0].requires_grad_(True)
        group["base_lr"] = group["lr"] = learning_rate
    return groups


def _relative_group(parameter: nn.Parameter) -> dict[str, Any]:
    size = float(parameter.detach().float().pow(2).mean().sqrt().clamp(min=1e-8))
    return {"params": [parameter], "scale": OTHER_SHARE * size}


def rate_factor(step: int, progress: float) -> float:
    """Linear warm-up over `WARMUP_STEPS`, then cosine decay with the budget's progress."""
    return min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 * (1.0 + math.cos(math.pi * progress))


def db(error: float) -> float:
    """A relative error in dB of SQNR."""
    return -10.0 * math.log10(max(error, 1e-30))


class Trainer:
    """The optimizer, the feature hooks and the training loop of one distillation."""

    def __init__(self, student: fx.GraphModule, teacher: nn.Module, features: bool,
                 learning_rate: float, held_out: HeldOut) -> None:
        self.student, self.teacher, self.held_out = student, teacher, held_out
        self.optimizer = StepScaledAdam(parameter_groups(student, learning_rate))
        self.options = {"features": features, "learning_rate": learning_rate}
        self.elapsed = 0.0
        """Seconds trained before this run (a resumed checkpoint's)."""
        self.features: dict[tuple[str, str], Tensor] = {}
        names = dict(teacher.named_modules())
        self.feature_names = [name for name, module in student.named_modules()
                              if features and isinstance(module, QATQuantizer) and name in names]
        self.hooks = [model.get_submodule(name).register_forward_hook(self._keep(side, name))
                      for name in self.feature_names
                      for side, model in (("student", student), ("teacher", teacher))]
        self.progress = shows_progress(state_of(student).config).progress

    def _keep(self, side: str, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            self.features[side, name] = output
        return hook

    def close(self) -> None:
        """Remove the feature hooks (the student is returned, pickled, run again)."""
        for hook in self.hooks:
            hook.remove()
        self.features.clear()

    def loss(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """Output error plus the mean error of the quantized activations (both relative)."""
        with torch.no_grad():
            targets = output_tensors(self.teacher(*inputs))
        outputs = output_tensors(self.student(*inputs))
        loss = sum(relative_error(output, target)
                   for output, target in zip(outputs, targets)) / max(1, len(outputs))
        if self.feature_names:
            loss = loss + sum(
                relative_error(self.features["student", name], self.features["teacher", name])
                for name in self.feature_names) / len(self.feature_names)
        self.features.clear()
        return loss

    def run(self, batches: Iterator[tuple[Tensor, ...]], start: int, budget: tuple[int, float],
            checkpoint: str | os.PathLike | None) -> None:
        """Train from step `start` until the budget ends (steps, or seconds in all)."""
        steps, seconds = budget
        began = time.monotonic() - self.elapsed
        step = start
        with tqdm(total=None if steps >= NO_STEP_LIMIT else steps, initial=start,
                  desc="distill", unit="step", leave=False,
                  disable=None if self.progress else True) as bar:
            while True:
                self.elapsed = time.monotonic() - began
                progress = max_over_ranks(min(1.0, max(step / steps, self.elapsed / seconds)))
                if progress >= 1.0:
                    break
                for group in self.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * rate_factor(step, progress)
                _train_mode(self.student)
                loss = self.loss(next(batches))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(self.student)
                self.optimizer.step()
                step += 1
                bar.update(1)
                bar.set_postfix(error_db=f"{db(loss.item()):.1f}")
                self._after_step(step, checkpoint, final=False)
        self._after_step(step, checkpoint, final=True)

    def _after_step(self, step: int, checkpoint: str | os.PathLike | None, final: bool) -> None:
        """Judge the held-out error every `JUDGE_EVERY` steps, checkpoint every
        `CHECKPOINT_EVERY` (both at the end too)."""
        if (step % JUDGE_EVERY == 0) != final:
            self.held_out.judge(self.student, step)
        if checkpoint is not None and (step % CHECKPOINT_EVERY == 0) != final:
            save_checkpoint(os.fspath(checkpoint), self, step)


def _train_mode(student: nn.Module) -> None:
    """Train mode for the quantizers and the controller; dropout stays off (the teacher
    runs without it, and a resumed run must draw no random numbers)."""
    student.train()
    for module in student.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()
