"""Part `analyze_speed`: what `qf.analyze` costs, as a multiple of one calibration.

Issue 15 asks that analyze reuse one float and one quantized pass per batch instead of a model
run per layer. Measured on torchvision models with random weights and random 224x224 inputs:
the wall time of `prepare` + `calibrate` on the batches analyze measures, against `analyze` on
the same batches (its per-tensor statistics, the end-to-end 8/16-bit checks and the bisection
for the 16-bit suggestion, log2(candidates) extra calibrations).

    python -m benchmarks analyze_speed
"""

from __future__ import annotations

import time

import torch
import torchvision

import quantfx as qf
from benchmarks.report import PartResult, Table
from benchmarks.training import configure_threads
from quantfx.analysis.analyze import MAX_BATCHES

MODELS = ("resnet18", "mobilenet_v2")
BATCH_SIZE = 2
INPUT_SHAPE = (3, 224, 224)

DESCRIPTION = (
    f"Wall time of `qf.analyze` against one calibration (`prepare` + `calibrate`, bias "
    f"calibration on) on the same {MAX_BATCHES} batches of {BATCH_SIZE} random "
    f"{'x'.join(map(str, INPUT_SHAPE))} inputs, torchvision models with random weights (seed "
    "0), default target (6 dB above the 8-bit SQNR, at most 3 dB below 16-bit). 'tensors' is "
    "how many quantized tensors analyze ranks: a tool that quantized one tensor at a time "
    "would need that many quantized model runs per batch on top of a calibration."
)


def time_model(name: str) -> dict[str, object]:
    """One row: calibration and analyze wall time on `name`, and what analyze found."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(BATCH_SIZE, *INPUT_SHAPE, generator=generator)
               for _ in range(MAX_BATCHES)]
    example = batches[0][:1]
    config = qf.QuantConfig(progress=False)
    start = time.perf_counter()
    qf.calibrate(qf.prepare(model, example, config), batches)
    calibration = time.perf_counter() - start
    start = time.perf_counter()
    report = qf.analyze(model, example, batches, config=config)
    seconds = time.perf_counter() - start
    return {
        "model": name, "tensors": len(report.tensors), "calibration s": calibration,
        "analyze s": seconds, "analyze / calibration": seconds / calibration,
        "int8 SQNR dB": report.output_sqnr_db["int8"],
        "int16 SQNR dB": report.output_sqnr_db["int16"],
        "16-bit layers suggested": len(report.sixteen_bit_layers),
        "suggested SQNR dB": report.output_sqnr_db["suggested"],
        "target reached": "yes" if report.reached else "no",
    }


def run(progress: bool = True) -> PartResult:
    """Time analyze against calibration on each model."""
    threads = configure_threads()
    columns = ["model", "tensors", "calibration s", "analyze s", "analyze / calibration",
               "int8 SQNR dB", "int16 SQNR dB", "16-bit layers suggested", "suggested SQNR dB",
               "target reached"]
    table = Table("qf.analyze cost against one calibration", columns,
                  note=f"torch threads: {threads}; one run each (wall time, compare the ratio).")
    for name in MODELS:
        row = time_model(name)
        table.add(**row)
        print(f"[analyze_speed] {row}", flush=True)
    return PartResult("analyze_speed", DESCRIPTION, [table])


if __name__ == "__main__":
    from benchmarks.__main__ import main

    main(["analyze_speed"])
