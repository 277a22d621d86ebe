"""What `quantfx.distill` keeps besides the student: the held-out judge (the best state seen)
and checkpoints (student, optimizer, step and judge in one file written atomically, by rank 0
only under torch.distributed), resumed on restart."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from quantfx.distributed import broadcast_from_first, mean_over_ranks, world_size
from quantfx.errors import LoadError
from quantfx.files import check_destination, staged_files
from quantfx.passes.graph_utils import flatten_values

FORMAT = "quantfx-distill-1"
"""Written into every checkpoint; a file without it is not one."""


JUDGE_EVERY = 25
"""Steps between judgements of the held-out error (and at the end)."""


def save_checkpoint(path: str, trainer: Any, step: int) -> None:
    """Write `trainer`'s checkpoint at `path` (atomically; only rank 0 under distributed)."""
    if world_size() > 1 and torch.distributed.get_rank() != 0:
        return
    check_destination(path, "distill checkpoint", LoadError)
    with staged_files(path) as (temporary,):
        torch.save({"format": FORMAT, "step": step, "elapsed": trainer.elapsed,
                    "options": trainer.options, "student": trainer.student.state_dict(),
                    "optimizer": trainer.optimizer.state_dict(),
                    "held_out": trainer.held_out.state()}, temporary)


def check_checkpoint_path(path: str) -> None:
    """`LoadError` unless a checkpoint can be read from / written at `path` (checked before
    calibration and training, not after)."""
    if os.path.isdir(path):
        raise LoadError(f"the distill checkpoint {path!r} is a folder; give a file path.")
    check_destination(path, "distill checkpoint", LoadError)


def load_checkpoint(path: str, trainer: Any) -> int:
    """Resume `trainer` from the checkpoint at `path` if there is one: the step it reached (0
    if none). Under torch.distributed rank 0 reads it and every rank resumes from that."""
    saved = broadcast_from_first(_read(path) if world_size() == 1 or
                                 torch.distributed.get_rank() == 0 else None)
    if isinstance(saved, str):
        raise LoadError(saved)
    if saved is None:
        return 0
    try:
        options = saved["options"]
        if options != trainer.options:
            raise ValueError(f"it was made with {options}, this call asks for "
                             f"{trainer.options}")
        trainer.student.load_state_dict(saved["student"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        trainer.held_out.load(saved["held_out"])
        trainer.elapsed = float(saved["elapsed"])
        return int(saved["step"])
    except (LoadError, RuntimeError, ValueError, KeyError, TypeError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = " ".join(lines[1:2] or lines[:1])[:300]  # torch's first line names no key
        raise LoadError(f"the distill checkpoint {path!r} belongs to another model or setup "
                        f"({detail}). Delete it, or use the model and options it was made "
                        "with.") from error


def _read(path: str) -> dict | str | None:
    """The checkpoint's contents, None if there is none, or what is wrong with it (a message,
    so that under torch.distributed every rank raises it)."""
    if not os.path.exists(path):
        return None
    if os.path.getsize(path) == 0:
        return f"the distill checkpoint {path!r} is empty (0 bytes): delete it to start again."
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged file fails anywhere in the unpickler; and
        # torch's own text advises weights_only=False, which is not for a checkpoint
        return (f"{path!r} is not a file torch.save wrote (or it is damaged), so not a distill "
                "checkpoint: delete it to start again, or give another path.")
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        return f"{path!r} is not a quantfx distill checkpoint; give another path or delete it."
    return saved


class HeldOut:
    """The student's output error on a batch kept out of training, judged every
    `JUDGE_EVERY` steps: distill returns the best state it saw, never one worse than its start
    (straight-through training can lose: a small net calibrated to 43 dB lost 0.5-2 dB)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, inputs: tuple) -> None:
        self.inputs = inputs
        with torch.no_grad():
            self.targets = output_tensors(teacher(*inputs))
        self.best_error = math.inf
        self.best_state: dict[str, Tensor] = {}
        self.best_step = 0
        self.first_error = self.judge(student, 0)

    def error(self, student: nn.Module) -> float:
        """The student's mean relative output error (eval mode), averaged over the ranks."""
        was_training = student.training
        student.eval()
        with torch.no_grad():
            outputs = output_tensors(student(*self.inputs))
        student.train(was_training)
        error = sum(float(relative_error(output, target))
                    for output, target in zip(outputs, self.targets)) / max(1, len(outputs))
        return mean_over_ranks(error)

    def judge(self, student: nn.Module, step: int) -> float:
        """Keep the student's state if it is the best so far; its error."""
        error = self.error(student)
        if error < self.best_error or not self.best_state:  # the start is kept, even if NaN
            self.best_error, self.best_step = error, step
            self.best_state = {key: value.detach().clone()
                               for key, value in student.state_dict().items()}
        return error

    def restore_best(self, student: nn.Module) -> None:
        """Load the best state seen into `student`."""
        student.load_state_dict(self.best_state)

    def state(self) -> dict[str, Any]:
        return {"best_error": self.best_error, "best_step": self.best_step,
                "best_state": self.best_state, "first_error": self.first_error}

    def load(self, saved: dict[str, Any]) -> None:
        self.best_error, self.best_step = float(saved["best_error"]), int(saved["best_step"])
        self.best_state, self.first_error = saved["best_state"], float(saved["first_error"])


def output_tensors(value: Any) -> list[Tensor]:
    """Every floating-point tensor in a model output (tensor, tuple, list or dict)."""
    return [leaf for leaf in flatten_values(value)
            if isinstance(leaf, Tensor) and leaf.is_floating_point()]


def relative_error(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error over the teacher's mean square (1 / linear SQNR)."""
    return (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp(min=1e-12)
