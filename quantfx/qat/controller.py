"""`QATController`: counts train-mode forwards (and epochs) and applies the `QATSchedule`.

It is the first node of a QAT graph (no inputs, no users), so it runs once per forward; its
counters live in buffers, so `state_dict()` round-trips the schedule's progress.
"""

from __future__ import annotations

import torch
from torch import nn

from quantfx.config import QATSchedule
from quantfx.errors import ConfigError, warn
from quantfx.partial import quantized_parts
from quantfx.quantizers import thresholds_in
from quantfx.state import describe, state_of

CONTROLLER_NAME = "qat_controller"
STALE_CHECK_STEP = 64
"""Training steps after which a QAT model whose parameters never changed is reported (also at
each `end_qat_epoch`): enough for gradient accumulation, early enough to save the run."""
STILL_OCTAVES = 0.01
"""Learned log2 thresholds that moved less than this over the steps between `STALE_CHECK_STEP`
and an `end_qat_epoch` at least as many steps later are reported: their optimizer's steps are
too small to ever change an exponent."""


class QATController(nn.Module):
    """Counts train-mode forwards (and epochs) in buffers and applies the `QATSchedule`."""

    _is_impure = True  # keep fx's dead-code elimination away from it

    def __init__(self, schedule: QATSchedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("epoch", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("bn_frozen", torch.tensor(False))
        self.register_buffer("ranges_frozen", torch.tensor(False))
        self.__dict__["layers"] = []  # plain references: the graph module owns these modules
        self.__dict__["activation_quantizers"] = []

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}"

    def forward(self) -> None:
        if self.training:
            self.step += 1
            if int(self.step) == 1 or int(self.step) == STALE_CHECK_STEP:
                self.check_training()
            if int(self.step) == STALE_CHECK_STEP:
                self.__dict__["threshold_start"] = [t.detach().clone()
                                                    for t in self.learning_thresholds()]
            self.apply_schedule()
        elif not self.__dict__.get("ranges_checked"):
            self.check_ranges()

    def check_ranges(self) -> None:
        """Warn (once) when an eval-mode forward runs before any training step while some
        activation range is unmeasured: those quantizers pass values through, so what is
        measured then is the float model, not the quantized one (QAT from a float model)."""
        self.__dict__["ranges_checked"] = True  # once: not a read of `step` per eval forward
        if int(self.step) > 0:
            return
        unset = sum(not quantizer.observed for quantizer in self.activation_quantizers)
        if unset:
            warn(f"this QAT model runs {unset} of its {len(self.activation_quantizers)} "
                 "activations unquantized: their ranges are measured in training-mode "
                 "forwards and none has run yet, so what it computes now is the float model's. "
                 "Train it first (or start from a calibrated quantfx.prepare model) before "
                 "judging its accuracy.")

    def end_epoch(self) -> None:
        """Count one finished epoch and apply epoch-based freezes."""
        self.epoch += 1
        self.check_training()
        self.check_thresholds()
        self.apply_schedule()

    def learning_thresholds(self) -> list[nn.Parameter]:
        """The learned thresholds that are still learning (activations' until the freeze)."""
        quantizers = [layer.weight_quantizer for layer in self.layers]
        if not bool(self.ranges_frozen):
            quantizers += self.activation_quantizers
        return [threshold for quantizer in quantizers
                for threshold in thresholds_in(quantizer)]

    def check_thresholds(self) -> None:
        """Warn (once) when learned thresholds that are learning have not moved: TQT trains
        them with their own optimizer (Adam), an SGD fine-tuning rate never moves them."""
        start, thresholds = self.__dict__.get("threshold_start"), self.learning_thresholds()
        if (start is None or len(start) != len(thresholds) or not thresholds
                or int(self.step) < 2 * STALE_CHECK_STEP or self.__dict__.get("still_warned")):
            return
        moved = max(float((t.detach() - s).abs().max()) for t, s in zip(thresholds, start))
        if moved < STILL_OCTAVES:
            self.__dict__["still_warned"] = True
            warn(f"the {len(thresholds)} learned thresholds of the QAT model moved at most "
                 f"{moved:.1e} octaves in {int(self.step) - STALE_CHECK_STEP} steps: no "
                 "exponent will ever change. Train them with an optimizer of their own, as TQT "
                 "does: torch.optim.Adam(quantfx.quantizers.learned_thresholds(model), "
                 "lr=1e-2), and leave them out of the other optimizer (docs/qat.md).")

    def check_training(self) -> None:
        """Warn (once) when training steps ran but no layer parameter moved since the first
        one: the optimizer holds other parameters, typically the float model's (built before
        `prepare_qat`, which returns a new model)."""
        parameters = [p for layer in self.layers for p in layer.parameters() if p.requires_grad]
        if not parameters:
            return
        with torch.no_grad():
            fingerprint = float(sum(p.double().sum() + p.double().pow(2).sum()
                                    for p in parameters))
        first = self.__dict__.setdefault("first_fingerprint", (int(self.step), fingerprint))
        trained = int(self.step) - first[0]
        if trained > 1 and fingerprint == first[1] and not self.__dict__.get("stale_warned"):
            self.__dict__["stale_warned"] = True
            warn(
                f"none of the {len(parameters)} parameters of the QAT model changed in "
                f"{trained} training steps: the optimizer holds other parameters (typically "
                "the float model's: prepare_qat returns a new model and leaves the float one "
                "untouched). Build the optimizer after prepare_qat, on the returned model: "
                "optimizer = torch.optim.SGD(qat_model.parameters(), lr=...).")

    def apply_schedule(self) -> None:
        """Freeze BN statistics / ranges once their step or epoch count is exceeded."""
        step, epoch, schedule = int(self.step), int(self.epoch), self.schedule

        def due(step_limit: int | None, epoch_limit: int | None) -> bool:
            return (step_limit is not None and step > step_limit) or (
                epoch_limit is not None and epoch >= epoch_limit
            )

        if not bool(self.bn_frozen) and due(schedule.freeze_bn_step, schedule.freeze_bn_epoch):
            freeze_batchnorm(self)
        if not bool(self.ranges_frozen) and due(
            schedule.freeze_ranges_step, schedule.freeze_ranges_epoch
        ):
            freeze_ranges(self)


def controller_of(model: nn.Module) -> QATController:
    """The controller of a QAT model (or of its DDP wrapper), or a clear error."""
    if isinstance(model, QATController):
        return model
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    controller = getattr(module, CONTROLLER_NAME, None)
    if not isinstance(controller, QATController) and isinstance(module, nn.Module):
        controller = next((m for m in module.children() if isinstance(m, QATController)), None)
    if not isinstance(controller, QATController):
        raise ConfigError(
            f"expected a model returned by quantfx.prepare_qat (or its DDP wrapper), got "
            f"{describe(module)}. QAT starts from the float model or a calibrated "
            "quantfx.prepare model: quantfx.prepare_qat(model, example_inputs)."
        )
    return controller


def freeze_batchnorm(model: nn.Module) -> None:
    """Freeze BN statistics of every QAT layer now (the schedule does this automatically)."""
    controller = controller_of(model)
    for layer in controller.layers:
        layer.freeze_bn()
    controller.bn_frozen.fill_(True)


def freeze_ranges(model: nn.Module) -> None:
    """Freeze every activation range now: exponents stop following the data."""
    controller = controller_of(model)
    unseen = sum(1 for quantizer in controller.activation_quantizers if not quantizer.observed)
    if unseen:
        raise ConfigError(
            f"freezing the QAT ranges now would freeze {unseen} quantizer(s) that never saw "
            "data, which would then never quantize. Freeze after some training steps (a "
            "QATSchedule freeze_ranges_step/epoch > 0), or start QAT from a calibrated "
            "quantfx.prepare model.")
    for quantizer in controller.activation_quantizers:
        if quantizer.observed:
            quantizer.compute_exponent()
        quantizer.observer_enabled.fill_(False)
    controller.ranges_frozen.fill_(True)


def end_qat_epoch(model: nn.Module) -> None:
    """Tell a QAT model that one epoch finished (call once per epoch for epoch schedules); a
    partly quantized model passes it to each of its parts."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    state = state_of(module)
    controllers = ([m for m in module.modules() if isinstance(m, QATController)]
                   if quantized_parts(state) else [controller_of(model)])
    for controller in controllers:
        controller.end_epoch()
