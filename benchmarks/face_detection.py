"""Part `face_detection`: a real pretrained detector, facenet-pytorch's MTCNN cascade, with each
of its three nets quantized, against its float self on photos with faces (`benchmarks.faces`).

Rows: float; quantfx's default `QuantConfig()`, `target="tda4vm"`, `target="am68a"`, 16-bit
weights and activations; torch.ao FX PTQ (x86). Columns: how many float detections the
quantized cascade finds again (IoU > 0.5), the mean IoU and score change of those, the
detections float does not make, the time to quantize the three nets and, for quantfx, whether
the three exported ONNX files (P-Net at its first calibration size) agree with the converted
nets in ONNX Runtime. Skipped with a note where facenet-pytorch is missing.

    python -m benchmarks face_detection
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import quantfx as qf
from benchmarks.accuracy import torch_ao_ptq
from benchmarks.report import PartResult, Table
from benchmarks.training import configure_threads

DESCRIPTION = __doc__.split("\n\n    python")[0].strip()

CALIBRATION_SCENES, EVALUATION_SCENES = 12, 12
FACENET_INSTALL = "pip install --no-deps facenet-pytorch==2.6.0 requests"
QUANTFX_CONFIGS = (
    ("quantfx default", {}),
    ("quantfx target=tda4vm", {"target": "tda4vm"}),
    ("quantfx target=am68a", {"target": "am68a"}),
    ("quantfx 16-bit weights and activations", {"activation_bits": 16, "weight_bits": 16}),
)

Quantize = Callable[[nn.Module, list[torch.Tensor]], nn.Module]


def quantfx_net(overrides: dict[str, Any]) -> Quantize:
    """prepare, calibrate and convert one net with `QuantConfig(**overrides)`."""
    def quantize(net: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
        config = qf.QuantConfig(**({"progress": False} | overrides))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qf.QuantFxWarning)  # PReLU slopes stay float
            prepared = qf.prepare(net, batches[0][:1], config)
        return qf.convert(qf.calibrate(prepared, batches))
    return quantize


def files_agree(cascade: nn.Module, inputs: dict[str, list[torch.Tensor]], folder: Path) -> str:
    """Export the three converted nets; how many ONNX Runtime reproduces bit for bit."""
    from benchmarks.faces import NETS

    exact, worst = 0, 0.0
    for name in NETS:
        report = qf.export_onnx(getattr(cascade, name), inputs[name][0][:1],
                                folder / f"{name}.onnx")
        lsb = float(report.max_lsb_diff or 0.0)
        exact += lsb == 0.0
        worst = max(worst, lsb)
    return f"{exact}/{len(NETS)} bit-exact" + ("" if worst == 0 else f", max {worst:g} LSB")


def _methods() -> list[tuple[str, Quantize, dict[str, Any]]]:
    methods = [(label, quantfx_net(overrides), {}) for label, overrides in QUANTFX_CONFIGS]
    methods.append(("torch.ao FX PTQ (x86)", torch_ao_ptq,
                    {"note": "affine uint8, per-channel weights"}))
    return methods


def _measure(table: Table) -> None:
    from benchmarks.faces import (
        calibration_and_evaluation_scenes,
        detect,
        float_cascade,
        match,
        quantize_cascade,
        record_inputs,
    )

    calibration, evaluation = calibration_and_evaluation_scenes(CALIBRATION_SCENES,
                                                                EVALUATION_SCENES)
    cascade = float_cascade()
    inputs = record_inputs(cascade, calibration)
    reference = detect(cascade, evaluation)
    pasted = sum(len(scene.faces) for scene in evaluation)
    table.add(method="float", **{"float detections": sum(len(boxes) for boxes, _ in reference),
                                 "matched %": 100.0},
              note=f"{pasted} pasted faces and the astronaut's in {len(evaluation)} photos")
    for label, quantize, extra in _methods():
        start = time.perf_counter()
        try:
            quantized = quantize_cascade(cascade, inputs, quantize)
            seconds = time.perf_counter() - start
            row = match(reference, detect(quantized, evaluation)) | extra
            if row["mean score change"] is not None:  # thousandths: 2 decimals would show 0
                row["mean score change"] = f"{row['mean score change']:.4f}"
            if label.startswith("quantfx"):
                with tempfile.TemporaryDirectory(prefix="quantfx-faces-") as folder:
                    row["ONNX files"] = files_agree(quantized, inputs, Path(folder))
        except Exception as error:  # noqa: BLE001 - a failing method is a result
            note = f"FAILED: {type(error).__name__}: {str(error)[:160]}"
            table.add(method=label, note=note)
            print(f"[face_detection] {label}: {note}", flush=True)
            continue
        table.add(method=label, seconds=seconds, **row)
        print(f"[face_detection] {label}: {row}", flush=True)


def run(progress: bool = True) -> PartResult:
    """Every method on the MTCNN cascade."""
    threads = configure_threads()
    table = Table(
        "MTCNN face detection (facenet-pytorch's pretrained cascade) on photos",
        ["method", "float detections", "matched %", "mean IoU", "mean score change",
         "extra detections", "ONNX files", "seconds", "note"],
        note=f"torch threads: {threads}. {CALIBRATION_SCENES} calibration and "
             f"{EVALUATION_SCENES} evaluation scenes (disjoint photos and faces) plus one whole "
             "photo each; the float cascade's own pipeline (pyramid, NMS, box regression) runs "
             "around the quantized nets. 'matched': float detections found again at IoU > 0.5 "
             "(greedy, highest float score first); 'mean IoU' and 'mean score change' "
             "(absolute) over those; 'extra detections': quantized detections matching none; "
             "'seconds': quantizing the three nets. 16-bit files: ONNX Runtime's reference "
             "kernels sum 16-bit "
             "products in float32, so a few LSB of a 16-bit output may differ (export allows 32).")
    try:
        import facenet_pytorch  # noqa: F401
        import skimage  # noqa: F401
    except ImportError as error:
        table.add(method="-", note=f"skipped: {error} ({FACENET_INSTALL})")
        return PartResult("face_detection", DESCRIPTION, [table])
    _measure(table)
    return PartResult("face_detection", DESCRIPTION, [table])


if __name__ == "__main__":
    from benchmarks.__main__ import main

    main(["face_detection"])
