"""Report parts for the costs a deployment sees: QAT step time, ONNX Runtime latency, file size.

`qat_step`: one training step (forward, loss, backward, SGD step) of quantfx QAT and of torch.ao
FX QAT over the float step, same model and batch, interleaved rounds (`benchmarks.qat_speed`).
`onnx_runtime`: latency of quantfx's exported int8 QDQ file vs the float ONNX model in ONNX
Runtime (all optimizations, no spinning, runs interleaved; `benchmarks.ort_latency`), batch 1
and 16, and the two files' sizes.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import torch
import torchvision

import quantfx as qf
from benchmarks.ort_latency import median_latency_ms, session
from benchmarks.qat_speed import MODELS as QAT_MODELS
from benchmarks.qat_speed import benchmark_model
from benchmarks.report import PartResult, Table
from benchmarks.training import configure_threads

QAT_DESCRIPTION = (
    "One training step (forward, loss, backward, SGD step) of quantfx QAT and of torch.ao FX "
    "QAT (x86 qconfig) over the float step: same model, same batch, interleaved rounds."
)
ORT_DESCRIPTION = (
    "Latency of quantfx's exported int8 QDQ file against the float ONNX model "
    "(torch.onnx.export) in ONNX Runtime with all graph optimizations and no spinning, runs "
    "of the two interleaved; and the size of the two files."
)
QAT_BATCH, QAT_SIZE = 32, 64
ORT_MODELS = ("resnet18", "mobilenet_v2")
ORT_BATCHES = (1, 16)
ORT_SIZE = 224


def run_qat_step(progress: bool = True) -> PartResult:
    """QAT step / float step for quantfx and torch.ao."""
    threads = configure_threads()
    table = Table(
        "QAT training step / float training step",
        ["model", "float ms", "quantfx QAT ms", "quantfx learned ranges ms",
         "quantfx learned ranges and weights ms", "torch.ao QAT ms", "quantfx / float",
         "learned ranges / float", "learned ranges and weights / float", "torch.ao / float"],
        note=f"torch threads: {threads}; batch {QAT_BATCH}, {QAT_SIZE}x{QAT_SIZE}, random "
             "init, median of 5 interleaved rounds of 3 steps. Targets: quantfx <= 1.5x; "
             "learned thresholds <= 1.3x on resnet18, <= 1.6x on mobilenet_v2 (learned ranges: "
             "QATSchedule(ranges='learned'); and weights: weight_exponent='learned' too).",
    )
    for name in QAT_MODELS:
        times = benchmark_model(name, QAT_BATCH, QAT_SIZE, rounds=5, steps=3)
        table.add(**{
            "model": name,
            "float ms": times["float"] * 1e3,
            "quantfx QAT ms": times["quantfx"] * 1e3,
            "quantfx learned ranges ms": times["quantfx learned"] * 1e3,
            "quantfx learned ranges and weights ms": times["quantfx learned weights"] * 1e3,
            "torch.ao QAT ms": times["torch.ao"] * 1e3,
            "quantfx / float": times["quantfx"] / times["float"],
            "learned ranges / float": times["quantfx learned"] / times["float"],
            "learned ranges and weights / float": times["quantfx learned weights"]
            / times["float"],
            "torch.ao / float": times["torch.ao"] / times["float"],
        })
    return PartResult("qat_step", QAT_DESCRIPTION, [table])


def run_onnx_runtime(progress: bool = True) -> PartResult:
    """ONNX Runtime latency and file size, int8 QDQ (quantfx) vs float."""
    threads = configure_threads()
    warnings.filterwarnings("ignore")
    table = Table(
        "ONNX Runtime latency and file size: quantfx int8 QDQ vs float",
        ["model", "batch", "float ms", "int8 ms", "speedup", "float MB", "int8 MB"],
        note=f"{ORT_SIZE}x{ORT_SIZE} inputs, {threads} intra-op thread(s), median of "
             "interleaved runs; calibrated on 16 random images.",
    )
    for name in ORT_MODELS:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name).eval()
        calibration = torch.randn(16, 3, ORT_SIZE, ORT_SIZE)
        prepared = qf.prepare(model, (calibration[:1],), qf.QuantConfig(progress=progress))
        qf.calibrate(prepared, calibration.split(8))
        converted = qf.convert(prepared)
        with tempfile.TemporaryDirectory() as directory:
            for batch in ORT_BATCHES:
                example = torch.randn(batch, 3, ORT_SIZE, ORT_SIZE)
                int8_path = os.path.join(directory, f"{name}_int8_{batch}.onnx")
                float_path = os.path.join(directory, f"{name}_float_{batch}.onnx")
                report = qf.export_onnx(converted, (example,), int8_path, verify=batch == 1)
                torch.onnx.export(model, (example,), float_path, dynamo=False,
                                  opset_version=report.opset, input_names=["x"])
                sessions = {"float": session(float_path, threads),
                            "int8": session(int8_path, threads)}
                medians = median_latency_ms(sessions, example.numpy(), 15 if batch == 1 else 5)
                table.add(**{
                    "model": name, "batch": batch,
                    "float ms": medians["float"], "int8 ms": medians["int8"],
                    "speedup": medians["float"] / medians["int8"],
                    "float MB": os.path.getsize(float_path) / 2**20,
                    "int8 MB": os.path.getsize(int8_path) / 2**20,
                })
    return PartResult("onnx_runtime", ORT_DESCRIPTION, [table])
