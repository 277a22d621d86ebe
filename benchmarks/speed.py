"""Part `speed`: how much slower a calibration forward (observers on) is than a float forward.

Batch 64, torchvision ResNet-18 and MobileNetV2 with random weights at 112x112 (a quarter of
the pixels of 224x224 keeps the part within its time budget on two cores; the ratio is what
matters). quantfx with its default (histogram) and min/max observers; torch.ao FX as the peer.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torchvision

import quantfx as qf
from benchmarks.report import Chart, PartResult, Table
from benchmarks.training import configure_threads

MODELS = ("resnet18", "mobilenet_v2")
BATCH = 64
SIZE = 112
REPEATS = 5

DESCRIPTION = (
    f"Calibration forward (observers recording ranges, under no_grad) vs float forward: median "
    f"of {REPEATS} timed batches after one warm-up, "
    f"float and calibration runs alternating, batch {BATCH}, input {SIZE}x{SIZE}, random "
    "weights. Ratio > 1 means calibration is slower than inference. quantfx's prepared model "
    "has BatchNorm folded into the convs, so its forward skips the float model's BN passes."
)


def median_forward_seconds(
    float_model: Callable, observed_model: Callable, images: torch.Tensor
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median (wall, CPU) time of a no-grad forward of each model, after one warm-up pass.

    The two models alternate, so that load from other processes drifting over time affects
    both alike (this machine is shared).
    """
    times: dict[int, tuple[list[float], list[float]]] = {0: ([], []), 1: ([], [])}
    with torch.no_grad():
        float_model(images)
        observed_model(images)
        for _ in range(REPEATS):
            for index, model in enumerate((float_model, observed_model)):
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                model(images)
                times[index][0].append(time.perf_counter() - start_wall)
                times[index][1].append(time.process_time() - start_cpu)
    return tuple(  # type: ignore[return-value]
        (statistics.median(wall), statistics.median(cpu)) for wall, cpu in times.values())


def torch_ao_observed(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> Callable:
    """torch.ao FX's prepared model (observers on), the peer's calibration forward."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_fx

        return prepare_fx(model, get_default_qconfig_mapping("x86"), example)


def measure_model(name: str, table: Table) -> list[tuple[str, float]]:
    """Add the rows of torchvision model `name` to `table`; return (method, ratio) pairs."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    images = torch.randn(BATCH, 3, SIZE, SIZE)
    example = (images[:1],)
    observed = {
        "quantfx default (histogram)": qf.prepare(model, example, qf.QuantConfig(progress=False)),
        "quantfx min/max": qf.prepare(
            model, example, qf.QuantConfig(activation_observer="minmax", progress=False)),
        "torch.ao FX (x86 qconfig)": torch_ao_observed(model, example),
    }
    ratios = []
    for method, prepared in observed.items():
        (float_wall, float_cpu), (wall, cpu) = median_forward_seconds(model, prepared, images)
        table.add(model=name, **{"float forward s": float_wall, "float CPU s": float_cpu,
                                 "method": method, "calibration forward s": wall,
                                 "calibration CPU s": cpu, "ratio (CPU)": cpu / float_cpu,
                                 "ratio (wall)": wall / float_wall})
        ratios.append((method, cpu / float_cpu))
        print(f"[speed] {name} {method}: {cpu / float_cpu:.2f}x CPU", flush=True)
    return ratios


def run(progress: bool = True) -> PartResult:
    """Time float and calibration forwards for each model and observer choice."""
    threads = configure_threads()
    table = Table(
        "Calibration forward / float forward",
        ["model", "method", "float forward s", "float CPU s", "calibration forward s",
         "calibration CPU s", "ratio (CPU)", "ratio (wall)"],
        note=f"torch threads: {threads}; lower ratio is better. The CPU-time ratio is the one "
             "to read on a shared machine (wall time includes waiting for a core).",
    )
    labels, ratios = [], []
    for name in MODELS:
        for method, ratio in measure_model(name, table):
            labels.append(f"{name} {method}")
            ratios.append(ratio)
    chart = Chart("calibration forward / float forward (CPU time, x)",
                  "benchmarks-speed-calibration.png", labels, ratios, "x")
    return PartResult("speed", DESCRIPTION, [table], [chart])
