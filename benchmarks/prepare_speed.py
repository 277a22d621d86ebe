"""Part `prepare_speed`: wall time of quantfx prepare / convert / export on torchvision models.

Issue #2 promises that preparing a ResNet-50 takes well under a second. Median of several runs,
random-init models, 1x3x224x224 example input; torch.ao's `prepare_fx` is timed as the peer.

    python -m benchmarks prepare_speed
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

import quantfx as qf
from benchmarks.report import PartResult, Table
from benchmarks.training import configure_threads

MODELS = ("resnet18", "resnet50", "mobilenet_v2")
REPEATS = 5
EXPORT_REPEATS = 3
INPUT_SHAPE = (1, 3, 224, 224)

DESCRIPTION = (
    f"Median wall and CPU time (s) over {REPEATS} runs ({EXPORT_REPEATS} for export) of each "
    f"quantfx stage on torchvision models with random weights, example input {INPUT_SHAPE}. "
    "Convert follows a calibration on 2 random images (not timed). Export includes quantfx's own "
    "verification in ONNX Runtime (on by default). The last column is torch.ao FX "
    "`prepare_fx` (x86 qconfig) on the same model, for scale."
)


def median_seconds(work: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time of `work()` over `repeats` calls.

    CPU time (this process, one torch thread) is what to compare on a busy shared machine:
    wall time there includes waiting for a core.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        work()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def torch_ao_prepare(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> object:
    """The peer's prepare step (deprecated torch.ao FX API; benchmarks only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_fx

        return prepare_fx(model, get_default_qconfig_mapping("x86"), example)


def time_model(name: str, config: qf.QuantConfig) -> dict[str, object]:
    """One table row: the median times of each stage on torchvision model `name`."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    example = (torch.randn(*INPUT_SHAPE),)
    row: dict[str, object] = {
        "model": name, "parameters (M)": sum(p.numel() for p in model.parameters()) / 1e6,
    }

    def record(stage: str, times: tuple[float, float]) -> None:
        row[f"{stage} s"], row[f"{stage} CPU s"] = times

    record("prepare", median_seconds(lambda: qf.prepare(model, example, config), REPEATS))
    prepared = qf.prepare(model, example, config)
    qf.calibrate(prepared, [torch.randn(2, *INPUT_SHAPE[1:])])
    record("convert", median_seconds(lambda: qf.convert(prepared), REPEATS))
    if hasattr(qf, "export_onnx"):
        converted = qf.convert(prepared)
        with tempfile.TemporaryDirectory(prefix="quantfx-bench-") as folder:
            path = Path(folder) / f"{name}.onnx"
            record("export", median_seconds(lambda: qf.export_onnx(converted, example, path),
                                            EXPORT_REPEATS))
    record("torch.ao prepare_fx", median_seconds(lambda: torch_ao_prepare(model, example), 3))
    return row


def run(progress: bool = True) -> PartResult:
    """Time prepare, convert and (when present) export of each model."""
    threads = configure_threads()
    stages = ["prepare", "convert", *(["export"] if hasattr(qf, "export_onnx") else []),
              "torch.ao prepare_fx"]
    columns = ["model", "parameters (M)"]
    for stage in stages:
        columns += [f"{stage} s", f"{stage} CPU s"]
    table = Table("quantfx stage wall time and CPU time (median)", columns,
                  note=f"torch threads: {threads}. 's' is wall time, 'CPU s' the process's "
                       "CPU time (robust to other load on the machine).")
    config = qf.QuantConfig(progress=False)
    for name in MODELS:
        row = time_model(name, config)
        table.add(**row)
        print(f"[prepare_speed] {row}", flush=True)
    return PartResult("prepare_speed", DESCRIPTION, [table])


if __name__ == "__main__":
    from benchmarks.__main__ import main

    main(["prepare_speed"])
