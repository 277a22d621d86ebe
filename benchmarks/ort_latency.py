"""ONNX Runtime latency: quantfx's int8 QDQ export of ResNet-18 vs the float ONNX model.

    python benchmarks/ort_latency.py [--runs 15] [--threads 1] [--out results/ort_latency.json]

Both files have static shapes (224x224, batch 1 and 16); the float one comes from
torch.onnx.export(dynamo=False). Sessions use all graph optimizations (so ORT fuses the QDQ
groups into its integer kernels) and `session.intra_op.allow_spinning = 0`, so idle threads
of one session do not slow the other on a shared machine. Runs of the two models alternate,
and the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
import torchvision

import quantfx as qf
from quantfx.export.verify import onnxruntime_session


def session(path: str, threads: int) -> ort.InferenceSession:
    """A deployment-style CPU session: all optimizations, no spinning, `threads` intra-op."""
    return onnxruntime_session(path, threads, optimized=True)


def median_latency_ms(sessions: dict[str, ort.InferenceSession], feed: np.ndarray, runs: int,
                      warmup: int = 2) -> dict[str, float]:
    """Median wall time per run of each session, runs interleaved across sessions."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, {s.get_inputs()[0].name: feed})
    for _ in range(runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: feed})
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "ort_latency.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.threads))
    warnings.filterwarnings("ignore")

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    calibration = torch.randn(32, 3, args.size, args.size)
    prepared = qf.prepare(model, (calibration[:1],), qf.QuantConfig(progress=False))
    qf.calibrate(prepared, calibration.split(8))
    converted = qf.convert(prepared)

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for batch in args.batches:
            example = torch.randn(batch, 3, args.size, args.size)
            int8_path = os.path.join(directory, f"resnet18_int8_b{batch}.onnx")
            float_path = os.path.join(directory, f"resnet18_float_b{batch}.onnx")
            report = qf.export_onnx(converted, (example,), int8_path, verify=batch == 1)
            torch.onnx.export(model, (example,), float_path, dynamo=False,
                              opset_version=report.opset, input_names=["x"])
            sessions = {"float": session(float_path, args.threads),
                        "int8": session(int8_path, args.threads)}
            runs = max(3, args.runs if batch == 1 else args.runs // 3)
            medians = median_latency_ms(sessions, example.numpy(), runs)
            rows.append({
                "batch": batch,
                "float_ms": round(medians["float"], 2),
                "int8_qdq_ms": round(medians["int8"], 2),
                "speedup": round(medians["float"] / medians["int8"], 2),
                "runs": runs,
            })
    result = {
        "model": f"torchvision resnet18, {args.size}x{args.size}, 1000 classes",
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "rows": rows,
    }
    print(f"{'batch':>5} {'float ms':>10} {'int8 QDQ ms':>12} {'speedup':>8}")
    for row in rows:
        print(f"{row['batch']:>5} {row['float_ms']:>10.2f} {row['int8_qdq_ms']:>12.2f} "
              f"{row['speedup']:>7.2f}x")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
