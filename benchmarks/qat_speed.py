"""QAT training-step time over float training-step time: quantfx against torch.ao FX QAT.

Same model, same batch, same optimizer (SGD + momentum): one training step is forward, loss,
backward, optimizer step. The three variants (float, quantfx QAT, torch.ao QAT) are timed in
interleaved rounds and each reports the median step time; the ratios are against float.
Also times the two activation range estimators per call (the EMA min/max QAT uses versus the
histogram + MSE search PTC uses), which is why QAT uses the EMA.

    /work/venv/bin/python -m benchmarks.qat_speed [--batch 32] [--size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torchvision
from torch import nn

import quantfx as qf
from quantfx.observers import HistogramObserver, MovingAverageMinMaxObserver
from quantfx.qmath import exponent_for_max

MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
}


def torch_ao_qat(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The peer: torch.ao FX QAT with the x86 default QAT qconfig mapping."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"), (example,))


def make_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One training step of the user's usual loop, as a closure."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    model.train()

    def step() -> None:
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_steps(step: Callable[[], None], count: int) -> float:
    """Seconds per step over `count` steps."""
    start = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - start) / count


def benchmark_model(name: str, batch: int, size: int, rounds: int, steps: int) -> dict[str, float]:
    """Median step time of float / quantfx QAT (statistical ranges, learned ranges, learned
    ranges and weights) / torch.ao QAT, timed in interleaved rounds."""
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 10, (batch,))
    base = MODELS[name]()
    variants = {
        "float": base,
        "quantfx": qf.prepare_qat(base, images[:1]),
        "quantfx learned": qf.prepare_qat(base, images[:1], qf.QuantConfig(
            qat_schedule=qf.QATSchedule(ranges="learned"), progress=False)),
        "quantfx learned weights": qf.prepare_qat(base, images[:1], qf.QuantConfig(
            qat_schedule=qf.QATSchedule(ranges="learned", weight_exponent="learned"),
            progress=False)),
        "torch.ao": torch_ao_qat(MODELS[name]().train(), images[:1]),
    }
    variants["torch.ao"].load_state_dict(base.state_dict(), strict=False)
    steps_of = {key: make_step(model, images, labels) for key, model in variants.items()}
    for step in steps_of.values():  # warm-up: allocator, observers, first-call overheads
        time_steps(step, 2)
    samples: dict[str, list[float]] = {key: [] for key in steps_of}
    for _ in range(rounds):
        for key, step in steps_of.items():
            samples[key].append(time_steps(step, steps))
    return {key: statistics.median(values) for key, values in samples.items()}


def time_range_estimators(shape: tuple[int, ...], calls: int = 30) -> dict[str, float]:
    """Milliseconds per training-step call of each activation range estimator on one tensor."""
    x = torch.randn(shape).relu()
    ema = MovingAverageMinMaxObserver(momentum=0.1)
    histogram = HistogramObserver(bins=2048, search="mse")

    def ema_call() -> None:
        low, high = torch.aminmax(x)
        ema(torch.stack([low, high]))
        exponent_for_max(ema.max_abs(), 255)

    def histogram_call() -> None:
        histogram(x)
        histogram.exponent(255)

    results = {}
    for key, call in (("ema_minmax", ema_call), ("histogram_mse", histogram_call)):
        call()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        results[key] = (time.perf_counter() - start) / calls * 1e3
    return results


def main() -> None:
    """Run the benchmark and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed sample")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, "
          f"{args.size}x{args.size}, median of {args.rounds} interleaved rounds of "
          f"{args.steps} steps")
    print(f"{'model':<14}{'float ms':>10}{'quantfx ms':>12}{'torch.ao ms':>13}"
          f"{'quantfx/float':>15}{'torch.ao/float':>16}")
    for name in args.models:
        times = benchmark_model(name, args.batch, args.size, args.rounds, args.steps)
        print(f"{name:<14}{times['float'] * 1e3:>10.1f}{times['quantfx'] * 1e3:>12.1f}"
              f"{times['torch.ao'] * 1e3:>13.1f}{times['quantfx'] / times['float']:>15.2f}"
              f"{times['torch.ao'] / times['float']:>16.2f}")
    shape = (args.batch, 32, args.size // 2, args.size // 2)
    estimators = time_range_estimators(shape)
    print(f"range estimator per call on {shape}: EMA min/max {estimators['ema_minmax']:.2f} ms, "
          f"histogram+MSE search {estimators['histogram_mse']:.2f} ms")


if __name__ == "__main__":
    main()
