"""Part `detector`: mAP@0.5 of the repo's two detectors, YOLOX-style (benchmarks/yolo.py) and
YOLOv8-style (benchmarks/yolov8.py: C2f blocks, decoupled head, DFL boxes), in float,
after PTC at 8 bit (the default, whose calibration measures which layers need 16 bit, and
without that measurement), with 16-bit heads, with the first conv and the heads at 16 bit (as
named, nothing measured), and after one epoch of QAT from the PTC model; plus the exported
whole-detector file (heads verified bit for bit, decode + NMS as float ONNX ops; TIDL's
meta-architecture 6 for YOLOX, 8 for YOLOv8) scored in ONNX Runtime.

Data: 64x64 canvases of 1-3 Fashion-MNIST items at random scales and places (boxes known),
12,000 from the training split for training, 512 more for calibration, 1,000 from the test
split for scoring (score threshold 0.01, NMS 0.45, 100 detections per image).

    python -m benchmarks detector
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import quantfx as qf
from benchmarks import yolo, yolov8
from benchmarks.detection_data import make_canvases, mean_average_precision
from benchmarks.report import PartResult, Table
from benchmarks.training import configure_threads
from quantfx.export.verify import onnxruntime_session
from quantfx.state import state_of

DESCRIPTION = __doc__.split("\n\n    python")[0].strip()
QAT_LEARNING_RATE = 0.0005
"""Of four settings tried (5e-4 / 2e-3, 1 / 2 epochs, from PTC or from float): 71.1-71.6."""
DEFAULT = "PTC 8-bit (default: measured 16-bit layers)"
CONFIGS: dict[str, dict[str, Any]] = {
    DEFAULT: {},
    "PTC 8-bit, no measured mixed precision": {"widen_sensitive_layers": False},
    "PTC, 16-bit heads": {"sixteen_bit_layers": ("heads",), "widen_sensitive_layers": False},
    "PTC, 16-bit first conv + heads": {"sixteen_bit_layers": ("first", "heads"),
                                       "widen_sensitive_layers": False},
}
"""The default decides which layers run at 16 bit by measuring them (`widen_sensitive_layers`);
the hand-picked rows widen what they name and nothing else."""


@dataclass(frozen=True)
class Detector:
    """One of the repo's detectors: its module (trained_detector, predict, fit) and the
    meta-architecture its file is exported with."""

    title: str
    module: ModuleType
    arch: Callable[..., Any]
    filename: str


THRESHOLDS = dict(confidence_threshold=0.01, nms_threshold=0.45, top_k=100, keep_top_k=100)
DETECTORS = (
    Detector("YOLOX-style", yolo, lambda: qf.YoloxMetaArch(
        strides=yolo.STRIDES, num_classes=yolo.NUM_CLASSES, **THRESHOLDS), "tiny_yolox.onnx"),
    Detector("YOLOv8-style", yolov8, lambda: qf.Yolov8MetaArch(
        strides=yolov8.STRIDES, num_classes=yolov8.NUM_CLASSES, reg_max=yolov8.REG_MAX,
        **THRESHOLDS), "tiny_yolov8.onnx"),
)


def _ptc(model: torch.nn.Module, calibration, overrides: dict[str, Any]) -> torch.nn.Module:
    config = qf.QuantConfig(progress=False, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = qf.prepare(model, (calibration.images[:1],), config)
    qf.calibrate(prepared, [calibration.images[start:end]
                            for start, end in calibration.batches(64)])
    return prepared


def _file_map(detector: Detector, converted: torch.nn.Module, test, folder: Path
              ) -> tuple[float, float]:
    """(mAP of the exported whole-detector file in ONNX Runtime, its heads' bit-exact share)."""
    path = folder / detector.filename
    report = qf.export_onnx(converted, test.images[:1], path, detection=detector.arch(),
                            verify_data=[test.images[index:index + 1] for index in range(16)])
    session = onnxruntime_session(str(path))
    name = session.get_inputs()[0].name
    detections = []
    for index in range(len(test)):
        boxes, labels, scores = session.run(None, {name: test.images[index:index + 1].numpy()})[-3:]
        detections.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                           "scores": torch.from_numpy(scores)})
    return mean_average_precision(detections, test, yolo.NUM_CLASSES), report.fraction_identical


def _table(detector: Detector, threads: int, progress: bool) -> Table:
    module = detector.module
    model, train_seconds, cached = module.trained_detector(progress)
    test = yolo.make_test_set()
    calibration = make_canvases("train", 512, seed=2)
    table = Table(f"{detector.title} detector on Fashion-MNIST canvases: mAP@0.5 (%)",
                  ["method", "mAP@0.5", "vs float", "seconds", "note"],
                  note=f"torch threads: {threads}; float training "
                       f"{'cached' if cached else f'{train_seconds:.0f} s'} "
                       f"({yolo.EPOCHS} epochs on {yolo.TRAIN_IMAGES} canvases, SGD, TI's "
                       f"recipe); {len(test)} test canvases.")
    reference = mean_average_precision(module.predict(model, test), test, yolo.NUM_CLASSES)
    table.add(method="float", **{"mAP@0.5": reference, "vs float": 0.0})

    def add(method: str, converted: torch.nn.Module, start: float, note: str | None) -> None:
        score = mean_average_precision(module.predict(converted, test), test, yolo.NUM_CLASSES)
        table.add(method=method, seconds=time.perf_counter() - start, note=note,
                  **{"mAP@0.5": score, "vs float": score - reference})

    ptc_model = None
    for method, overrides in CONFIGS.items():
        start = time.perf_counter()
        prepared = _ptc(model, calibration, overrides)
        converted = qf.convert(prepared)
        widened = state_of(prepared).calibration_check.sixteen_bit
        add(method, converted, start, f"measured 16 bit: {', '.join(widened)}" if widened
            else None)
        if method == DEFAULT:
            ptc_model = converted  # the default's file is the one exported below
    start = time.perf_counter()
    qat = qf.prepare_qat(_ptc(model, calibration, {}), (calibration.images[:1],))
    module.fit(qat, yolo.make_training_set(), 1, QAT_LEARNING_RATE, progress)
    qf.end_qat_epoch(qat)
    add("QAT 8-bit (1 epoch from PTC)", qf.convert(qat), start, f"lr {QAT_LEARNING_RATE}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quantfx-yolo-") as folder:
        score, identical = _file_map(detector, ptc_model, test, Path(folder))
    table.add(method="PTC 8-bit, exported file in ONNX Runtime", seconds=time.perf_counter() -
              start, note=f"heads {100 * identical:.1f}% bit-identical; decode + NMS in ONNX",
              **{"mAP@0.5": score, "vs float": score - reference})
    for row in table.rows:
        print(f"[detector] {detector.title} {row}", flush=True)
    return table


def run(progress: bool = True) -> PartResult:
    threads = configure_threads()
    return PartResult("detector", DESCRIPTION, [_table(detector, threads, progress)
                                                for detector in DETECTORS])


if __name__ == "__main__":
    from benchmarks.__main__ import main

    main(["detector"])
