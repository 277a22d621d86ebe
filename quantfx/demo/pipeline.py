"""The demo's stages and its table.

A small CNN (conv + BN + ReLU blocks) is trained in float with fixed seeds, then prepared,
calibrated on a slice of the training set and converted; the table compares the float and the
quantized accuracy on the held-out test set; the exported ONNX file is run in ONNX Runtime and
a short QAT fine-tune follows.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import quantfx as qf
from quantfx.arguments import DEMO_DESCRIPTION as DESCRIPTION
from quantfx.arguments import add_demo_arguments as add_arguments
from quantfx.checks import check_bool, check_int
from quantfx.demo.datasets import DemoData, load_demo_data
from quantfx.demo.model import DemoNet, accuracy_of, predict, seed_everything, train_epochs
from quantfx.export.verify import onnxruntime_session


@dataclass
class StageResult:
    """One row of the demo's table."""

    stage: str
    seconds: float
    accuracy: float | None = None
    note: str = ""
    error: str | None = None


@dataclass
class DemoResult:
    """What the demo measured: one row per stage, plus the data set it ran on."""

    dataset: str
    train_size: int
    test_size: int
    image_size: int
    epochs: int
    stages: list[StageResult] = field(default_factory=list)

    def accuracy(self, stage: str) -> float | None:
        """Accuracy measured at the stage called `stage` (None if absent)."""
        return next((row.accuracy for row in self.stages if row.stage == stage), None)

    @property
    def failed(self) -> list[StageResult]:
        return [row for row in self.stages if row.error is not None]

    def table(self) -> str:
        """The result as a plain-text table."""
        header = (
            f"quantfx demo: {self.dataset}, {self.train_size} train / {self.test_size} test "
            f"images of {self.image_size}x{self.image_size}, {self.epochs} float epochs"
        )
        lines = [
            header,
            "",
            f"{'stage':<42} {'accuracy':>9} {'time (s)':>9}  note",
            f"{'-' * 42} {'-' * 9} {'-' * 9}  {'-' * 30}",
        ]
        for row in self.stages:
            accuracy = f"{100 * row.accuracy:8.2f}%" if row.accuracy is not None else "-"
            note = f"FAILED: {row.error}" if row.error else row.note
            lines.append(f"{row.stage:<42} {accuracy:>9} {row.seconds:9.2f}  {note}")
        return "\n".join(lines)


class _Stages:
    """Runs stages, timing each one; a failing optional stage is recorded, not raised."""

    def __init__(self, result: DemoResult, log: Callable[[str], None]) -> None:
        self.result = result
        self.log = log

    def run(self, stage: str, work: Callable[[], object], optional: bool = False) -> object:
        self.log(f"[quantfx demo] {stage} ...")
        start = time.perf_counter()
        try:
            value = work()
        except Exception as error:
            if not optional:
                raise
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            self.log(traceback.format_exc())
            self.result.stages.append(
                StageResult(stage, time.perf_counter() - start, error=message)
            )
            return None
        self.result.stages.append(StageResult(stage, time.perf_counter() - start))
        return value

    def set_accuracy(self, accuracy: float, note: str = "") -> None:
        self.result.stages[-1].accuracy = accuracy
        self.result.stages[-1].note = note


def run_demo(
    dataset: str = "auto",
    data_dir: str | None = None,
    epochs: int | None = None,
    qat_epochs: int = 1,
    calibration_images: int = 1000,
    batch_size: int = 64,
    seed: int = 0,
    threads: int = 1,
    verbose: bool = True,
) -> DemoResult:
    """Train a small CNN in float, quantize it with quantfx and print float vs quantized accuracy.

    Returns the measurements (the printed table is `result.table()`). A failure of the ONNX
    export or QAT stages is recorded in the table (and the exit status), not raised.
    """
    _check_options(epochs, qat_epochs, calibration_images, batch_size, seed, threads, verbose)
    torch.set_num_threads(threads)
    log: Callable[[str], None] = (
        (lambda text: print(text, file=sys.stderr)) if verbose else (lambda text: None)
    )
    seed_everything(seed)
    data = load_demo_data(dataset, data_dir, seed)
    fashion = data.image_size == 28
    epochs = epochs if epochs is not None else (3 if fashion else 20)
    result = DemoResult(data.name, len(data.train), len(data.test), data.image_size, epochs)
    stages = _Stages(result, log)
    example = (data.train.tensors[0][:1],)

    def train_float() -> nn.Module:
        seed_everything(seed)
        model = DemoNet(data.image_size)
        return train_epochs(model, data.train, epochs, 0.05, batch_size, seed, verbose)

    float_model = stages.run("float training", train_float)
    float_predictions = predict(float_model, data.test)
    stages.set_accuracy(accuracy_of(float_predictions, data.test), "float model on test set")

    config = qf.QuantConfig(progress=verbose)
    converted, quantized_predictions = _ptc_stages(stages, float_model, example, data, config,
                                                   calibration_images, batch_size)
    _export_stages(stages, converted, example, data, quantized_predictions)
    if qat_epochs > 0:
        _qat_stages(stages, float_model, example, data, config, qat_epochs, batch_size, seed)

    if verbose:
        print(result.table())
    return result


def _check_options(epochs: int | None, qat_epochs: int, calibration_images: int,
                   batch_size: int, seed: int, threads: int, verbose: bool) -> None:
    if epochs is not None:
        check_int(epochs, "epochs", 1)
    for name, value, minimum in (("qat_epochs", qat_epochs, 0),
                                 ("calibration_images", calibration_images, 1),
                                 ("batch_size", batch_size, 1), ("seed", seed, 0),
                                 ("threads", threads, 1)):
        check_int(value, name, minimum)
    check_bool(verbose, "verbose")


def _ptc_stages(stages: _Stages, float_model: nn.Module, example: tuple, data: DemoData,
                config: qf.QuantConfig, calibration_images: int, batch_size: int
                ) -> tuple[nn.Module, torch.Tensor]:
    """prepare -> calibrate -> convert -> evaluate; the converted model and its predictions."""
    prepared = stages.run("prepare", lambda: qf.prepare(float_model, example, config))
    calibration = TensorDataset(data.train.tensors[0][:calibration_images])
    calibration_loader = DataLoader(calibration, batch_size=batch_size)
    stages.run(
        f"calibrate ({len(calibration)} train images)",
        lambda: qf.calibrate(prepared, calibration_loader),
    )
    converted = stages.run("convert", lambda: qf.convert(prepared))
    quantized_predictions = stages.run(
        "quantized eval (converted model)", lambda: predict(converted, data.test)
    )
    stages.set_accuracy(accuracy_of(quantized_predictions, data.test), "int8 power-of-2 simulation")
    return converted, quantized_predictions


def _export_stages(
    stages: _Stages,
    converted: nn.Module,
    example: tuple[torch.Tensor, ...],
    data: DemoData,
    reference: torch.Tensor,
) -> None:
    """Export the converted model to QDQ ONNX and measure its accuracy in ONNX Runtime."""
    with tempfile.TemporaryDirectory(prefix="quantfx-demo-") as folder:
        path = os.path.join(folder, "demo.onnx")
        if (
            stages.run(
                "export ONNX (qf.export_onnx)",
                lambda: qf.export_onnx(converted, example, path) or True,
                optional=True,
            )
            is None
        ):
            return

        def run_onnxruntime() -> torch.Tensor:
            # The deployment session: all of ORT's optimizations, its integer QDQ kernels.
            session = onnxruntime_session(path, max(1, torch.get_num_threads()), optimized=True)
            input_name = session.get_inputs()[0].name
            fixed_batch = session.get_inputs()[0].shape[0]
            images = data.test.tensors[0].numpy()
            step = fixed_batch if isinstance(fixed_batch, int) and fixed_batch > 0 else 256
            outputs = [
                session.run(None, {input_name: images[i : i + step]})[0]
                for i in range(0, len(images), step)
            ]
            return torch.from_numpy(np.concatenate(outputs)).argmax(1)

        predictions = stages.run(
            "ONNX Runtime eval (exported model)", run_onnxruntime, optional=True
        )
        if predictions is not None:
            agreement = float((predictions == reference).float().mean())
            stages.set_accuracy(
                accuracy_of(predictions, data.test),
                f"top-1 agrees with converted model on {100 * agreement:.2f}%",
            )


def _qat_stages(
    stages: _Stages,
    float_model: nn.Module,
    example: tuple[torch.Tensor, ...],
    data: DemoData,
    config: qf.QuantConfig,
    qat_epochs: int,
    batch_size: int,
    seed: int,
) -> None:
    """A short quantization-aware fine-tune from the float model, then convert and evaluate."""

    def fine_tune() -> nn.Module:
        seed_everything(seed)
        qat_model = qf.prepare_qat(float_model, example, config)
        train_epochs(qat_model, data.train, qat_epochs, 0.005, batch_size, seed,
                     config.progress)
        return qf.convert(qat_model)

    converted = stages.run(
        f"QAT fine-tune ({qat_epochs} epoch(s)) + convert", fine_tune, optional=True
    )
    if converted is not None:
        predictions = stages.run(
            "QAT eval (converted model)", lambda: predict(converted, data.test), optional=True
        )
        if predictions is not None:
            stages.set_accuracy(accuracy_of(predictions, data.test), "int8 after QAT")


def run_from_arguments(args: argparse.Namespace) -> int:
    """Run the demo with parsed options; exit status 1 if an optional stage failed."""
    result = run_demo(
        dataset=args.dataset,
        data_dir=args.data_dir,
        epochs=args.epochs,
        qat_epochs=args.qat_epochs,
        calibration_images=args.calibration_images,
        batch_size=args.batch_size,
        seed=args.seed,
        threads=args.threads,
        verbose=not args.quiet,
    )
    if args.quiet:
        print(result.table())
    return 1 if result.failed else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m quantfx.demo`: the same as `quantfx demo`."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m quantfx.demo", description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    args = parser.parse_args(argv)
    try:
        return run_from_arguments(args)
    except qf.QuantFxError as error:
        print(f"quantfx demo: error: {error}", file=sys.stderr)
        return 2

