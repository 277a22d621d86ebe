"""Part `accuracy`: Fashion-MNIST test accuracy of quantfx against float and two peers.

For each 28x28 net of `benchmarks.models` (trained in float, cached): quantfx PTC (min/max,
default histogram+MSE, 16 bit), quantfx QAT and ONNX Runtime on quantfx's export when this
version has them, torch.ao FX PTQ (x86 qconfig) and ONNX Runtime's `quantize_static` (QDQ,
MinMax and Entropy). Every method calibrates on the same first 1000 training images.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import quantfx as qf
from benchmarks.data import calibration_subset, load_fashion_mnist
from benchmarks.models import MODEL_BUILDERS
from benchmarks.report import Chart, PartResult, Table
from benchmarks.training import configure_threads, predict, train_float_with_info
from quantfx.export.verify import onnxruntime_session
from quantfx.quantizers import learned_thresholds

CALIBRATION_IMAGES = 1000
CALIBRATION_BATCH = 100
EVAL_BATCH = 500
QAT_EPOCHS = 1
QAT_LEARNING_RATE = 0.002
THRESHOLD_RATE = 1e-2
"""Adam's rate for learned log2 thresholds (TQT trains them with Adam; SGD at the QAT rate
moves them about 1e-7 octaves a step, never changing an exponent)."""

DESCRIPTION = (
    f"Fashion-MNIST test accuracy (10,000 images, top-1 %) of three small nets trained in float "
    f"here (SGD, cosine LR, wd 1e-4 on all parameters; cached). Every post-training method "
    f"calibrates on the same first {CALIBRATION_IMAGES} training images. quantfx rows are the "
    "converted (integer-exact) model; 'ORT on quantfx export' runs quantfx's QDQ file in ONNX "
    "Runtime's default session, 'agreement' is the share of test images whose top-1 equals the "
    "converted PyTorch model's (the note gives the same for an unoptimized session, which runs "
    "the QDQ operators literally instead of ORT's fused integer kernels). "
    f"QAT: {QAT_EPOCHS} epoch(s) of SGD at lr {QAT_LEARNING_RATE} (cosine) from the "
    "calibrated PTC model."
)


def ort_predict(
    path: str | Path, dataset: TensorDataset, threads: int, literal: bool = False
) -> torch.Tensor:
    """Top-1 predictions of an ONNX file over `dataset` (batches of its static batch size)."""
    session = onnxruntime_session(str(path), threads, optimized=not literal)
    model_input = session.get_inputs()[0]
    batch = model_input.shape[0] if isinstance(model_input.shape[0], int) else EVAL_BATCH
    images = dataset.tensors[0].numpy()
    outputs = [session.run(None, {model_input.name: images[start : start + batch]})[0]
               for start in range(0, len(images), batch)]
    return torch.from_numpy(np.concatenate(outputs)).argmax(1)


def accuracy(predictions: torch.Tensor, dataset: TensorDataset) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((predictions == dataset.tensors[1]).float().mean())


def calibration_loader() -> DataLoader:
    """The fixed calibration batches (images only)."""
    images = calibration_subset(CALIBRATION_IMAGES).tensors[0]
    return DataLoader(TensorDataset(images), batch_size=CALIBRATION_BATCH)


def quantfx_ptc(model: nn.Module, config: qf.QuantConfig) -> tuple[nn.Module, nn.Module]:
    """quantfx prepare + calibrate + convert; returns (calibrated prepared, converted)."""
    example = (torch.zeros(1, 1, 28, 28),)
    prepared = qf.prepare(model, example, config)
    qf.calibrate(prepared, calibration_loader())
    return prepared, qf.convert(prepared)


def quantfx_qat(prepared: nn.Module, train: TensorDataset) -> nn.Module:
    """A short QAT fine-tune starting from a calibrated PTC model; returns the converted model."""
    example = (torch.zeros(1, 1, 28, 28),)
    torch.manual_seed(0)
    qat_model = qf.prepare_qat(prepared, example)
    loader = DataLoader(train, batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    try:
        thresholds = learned_thresholds(qat_model)  # TQT's recipe: Adam of their own
    except qf.ConfigError:  # the default schedule: exponents by rule, none to learn
        thresholds = []
    others = [p for p in qat_model.parameters() if all(p is not t for t in thresholds)]
    optimizer = torch.optim.SGD(others, lr=QAT_LEARNING_RATE, momentum=0.9, weight_decay=1e-4)
    threshold_optimizer = torch.optim.Adam(thresholds, lr=THRESHOLD_RATE) if thresholds else None
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, QAT_EPOCHS * len(loader))
    loss_function = nn.CrossEntropyLoss()
    qat_model.train()
    for _ in range(QAT_EPOCHS):
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            if threshold_optimizer is not None:
                threshold_optimizer.zero_grad(set_to_none=True)
            loss_function(qat_model(images), labels).backward()
            optimizer.step()
            if threshold_optimizer is not None:
                threshold_optimizer.step()
            scheduler.step()
        if hasattr(qf, "end_qat_epoch"):
            qf.end_qat_epoch(qat_model)
    qat_model.eval()
    return qf.convert(qat_model)


FASHION_EXAMPLE = (1, 1, 28, 28)


def _batches(batches: list[torch.Tensor] | None) -> list[torch.Tensor]:
    return [images for (images,) in calibration_loader()] if batches is None else batches


def torch_ao_ptq(model: nn.Module, batches: list[torch.Tensor] | None = None) -> nn.Module:
    """The peer: torch.ao FX graph-mode PTQ with the x86 default qconfig (deprecated API), on
    `batches` (default: the Fashion-MNIST calibration batches)."""
    batches = _batches(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        example = (torch.zeros(1, *batches[0].shape[1:]),)
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"),
                              example)
        with torch.no_grad():
            for images in batches:
                prepared(images)
        return convert_fx(prepared)


class _CalibrationReader:
    """ONNX Runtime's calibration data reader over calibration batches."""

    def __init__(self, input_name: str, batches: list[torch.Tensor] | None = None) -> None:
        self.batches = iter([{input_name: images.numpy()} for images in _batches(batches)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def export_float_onnx(model: nn.Module, path: Path,
                      shape: tuple[int, ...] = FASHION_EXAMPLE) -> None:
    """The float model as ONNX (TorchScript exporter, dynamic batch) for ORT's quantizer; a
    model with several outputs gets outputs output_0, output_1, ..."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = torch.zeros(shape)
        with torch.no_grad():
            outputs = model.eval()(example)
        count = len(outputs) if isinstance(outputs, (tuple, list)) else 1
        names = ["logits"] if count == 1 else [f"output_{index}" for index in range(count)]
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False,
                          input_names=["input"], output_names=names, opset_version=17,
                          dynamic_axes={"input": {0: "batch"}} | {name: {0: "batch"}
                                                                   for name in names})


def ort_quantize_static(
    float_path: Path, output_path: Path, method: str, per_channel: bool = False,
    batches: list[torch.Tensor] | None = None,
) -> None:
    """ONNX Runtime's own static QDQ quantization (U8S8) with `method` calibration.

    Note: through `quantize_static`, ORT 1.32's Entropy calibrator always gets num_bins =
    num_quantized_bins = 128, so its threshold search has one candidate and equals MinMax.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # ORT logs a pre-processing hint per call
    try:
        quantize_static(
            str(float_path), str(output_path), _CalibrationReader("input", batches),
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method),
            per_channel=per_channel,
        )
    finally:
        root_logger.setLevel(level)


def _timed(work: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = work()
    return value, time.perf_counter() - start


def run(progress: bool = True) -> PartResult:
    """Measure every method on every model; one table row per (model, method)."""
    threads = configure_threads()
    test = load_fashion_mnist("test")
    train = load_fashion_mnist("train")
    table = Table(
        "Fashion-MNIST accuracy (top-1 %, 10k test images)",
        ["model", "method", "accuracy %", "vs float (points)", "agreement %", "seconds", "note"],
        note=f"'seconds' is the method's own work (calibrate/convert, quantize, fine-tune), "
             f"torch threads: {threads}. Float training time is in the float row.",
    )
    charts: list[Chart] = []
    for name in MODEL_BUILDERS:
        _measure_model(name, table, train, test, threads, progress)
    for name in MODEL_BUILDERS:
        rows = [row for row in table.rows if row["model"] == name
                and row.get("vs float (points)") is not None]
        charts.append(Chart(f"{name}: accuracy change vs float (points)",
                            f"benchmarks-accuracy-{name}.png",
                            [row["method"] for row in rows],
                            [row["vs float (points)"] for row in rows]))
    return PartResult("accuracy", DESCRIPTION, [table], charts)


def _measure_model(
    name: str, table: Table, train: TensorDataset, test: TensorDataset, threads: int,
    progress: bool,
) -> None:
    """Add the rows of every method for the float model `name` to `table`."""
    model, info = train_float_with_info(name, progress=progress)
    float_accuracy = 100.0 * info.test_accuracy
    table.add(model=name, method="float", **{
        "accuracy %": float_accuracy, "seconds": info.seconds,
        "note": f"{info.config['epochs']} epochs" + (" (cached)" if info.cached else "")})

    def add(method: str, work: Callable[[], tuple[float, float | None, str]]) -> None:
        try:
            (value, agreement, note), seconds = _timed(work)
        except Exception as error:  # noqa: BLE001 - a failing method is a result, not a crash
            first_line = str(error).splitlines()[0] if str(error) else ""
            table.add(model=name, method=method,
                      note=f"FAILED: {type(error).__name__}: {first_line[:160]}")
            return
        table.add(model=name, method=method, **{
            "accuracy %": value, "vs float (points)": value - float_accuracy,
            "agreement %": agreement, "seconds": seconds, "note": note})

    converted_models: dict[str, nn.Module] = {}
    prepared_default: dict[str, nn.Module] = {}

    def ptc(label: str, config: qf.QuantConfig) -> Callable[[], tuple[float, None, str]]:
        def work() -> tuple[float, None, str]:
            prepared, converted = quantfx_ptc(model, config)
            converted_models[label] = converted
            prepared_default.setdefault(label, prepared)
            return accuracy(predict(converted, test, EVAL_BATCH), test), None, ""
        return work

    quiet = {"progress": False}
    add("quantfx PTC min/max", ptc("minmax", qf.QuantConfig(activation_observer="minmax",
                                                             **quiet)))
    add("quantfx PTC default (histogram+MSE)", ptc("default", qf.QuantConfig(**quiet)))
    add("quantfx PTC 16-bit", ptc("16bit", qf.QuantConfig(activation_bits=16,
                                                          weight_bits=16, **quiet)))
    if hasattr(qf, "export_onnx"):
        add("ORT on quantfx export (default)",
            lambda: _ort_on_quantfx_export(converted_models.get("default"), test, threads))
    if hasattr(qf, "prepare_qat"):
        add("quantfx QAT (from PTC default)",
            lambda: (accuracy(predict(quantfx_qat(prepared_default["default"], train), test),
                              test), None, f"{QAT_EPOCHS} epoch(s)"))
    add("torch.ao FX PTQ (x86)",
        lambda: (accuracy(predict(torch_ao_ptq(model), test), test), None,
                 "per-channel weights, affine uint8"))
    with tempfile.TemporaryDirectory(prefix="quantfx-bench-") as folder:
        float_path = Path(folder) / "float.onnx"
        export_float_onnx(model, float_path)
        variants = [("MinMax", False, "QDQ U8S8, per-tensor weights"),
                    ("Entropy", False, "QDQ U8S8; ORT's default bins make it equal MinMax"),
                    ("Percentile", False, "QDQ U8S8, 99.999th percentile"),
                    ("MinMax", True, "QDQ U8S8, per-channel weights")]
        for method, per_channel, note in variants:
            label = f"ORT quantize_static {method}" + (" per-channel" if per_channel else "")

            def ort_work(method: str = method, per_channel: bool = per_channel,
                         note: str = note) -> tuple[float, None, str]:
                path = Path(folder) / f"ort-{method}-{per_channel}.onnx"
                ort_quantize_static(float_path, path, method, per_channel)
                return accuracy(ort_predict(path, test, threads), test), None, note
            add(label, ort_work)


def _ort_on_quantfx_export(
    converted: nn.Module | None, test: TensorDataset, threads: int
) -> tuple[float, float, str]:
    """Export the converted model with quantfx, run it in ORT, measure accuracy and agreement."""
    if converted is None:
        raise RuntimeError("quantfx PTC default failed, nothing to export")
    with tempfile.TemporaryDirectory(prefix="quantfx-bench-") as folder:
        path = Path(folder) / "quantfx.onnx"
        example = (test.tensors[0][:EVAL_BATCH],)
        report = qf.export_onnx(converted, example, path)
        ort_predictions = ort_predict(path, test, threads)
        literal_predictions = ort_predict(path, test, threads, literal=True)
    reference = predict(converted, test, EVAL_BATCH)
    agreement = 100.0 * float((ort_predictions == reference).float().mean())
    literal_agreement = 100.0 * float((literal_predictions == reference).float().mean())
    note = (f"ORT default session (integer kernels); unoptimized session: "
            f"{accuracy(literal_predictions, test):.2f}% accuracy, {literal_agreement:.2f}% "
            "agreement")
    if getattr(report, "max_lsb_diff", None) is not None:
        note += f"; export's own check: max {report.max_lsb_diff:g} LSB"
    return accuracy(ort_predictions, test), agreement, note
