"""Part `hard_cases`: post-training quantization where it is hard.

The accuracy part's nets follow TI's recipe and every method lands near float on them. Here:

- `mobilenetv2_style` (the recipe) with **one weight scale per depthwise layer** (TDA4VM);
- `mobilenetv2_norecipe`: the same net as code bases outside TI's guidelines write it (convs
  without BatchNorm, BatchNorm after ReLU), trained with Adam and no weight decay (cached like
  the others);
- MTCNN's **ONet from facenet-pytorch**: pretrained weights that ship inside the package (no
  download; PReLU, no BatchNorm), on crops of the two photographs that ship with scikit-learn.
  Optional: `pip install --no-deps facenet-pytorch==2.6.0 requests` (the bench session does);
  skipped with a note where it is missing.

Rows: float; quantfx's default for the case and its variants (without / with cross-layer
equalization, learned rounding, per-channel weights, 16-bit first layer), QAT (Fashion-MNIST
cases; statistical and learned ranges), torch.ao FX PTQ (x86: affine, per-channel weights),
ONNX Runtime `quantize_static` (MinMax, per-channel), and Brevitas' graph equalization before
quantfx's PTC where Brevitas imports. Accuracy (Fashion-MNIST: 10k test images), top-1
agreement with float, output SQNR against float, time.

    python -m benchmarks hard_cases
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import quantfx as qf
from benchmarks.accuracy import (
    THRESHOLD_RATE,
    calibration_loader,
    export_float_onnx,
    ort_quantize_static,
    quantfx_qat,
    torch_ao_ptq,
)
from benchmarks.data import load_fashion_mnist
from benchmarks.report import PartResult, Table
from benchmarks.training import configure_threads, train_float, train_float_with_info
from quantfx.export.verify import onnxruntime_session

ONET_CALIBRATION, ONET_TEST = 256, 512
SQNR_IMAGES = 2000

DESCRIPTION = __doc__.split("\n\n    python")[0].strip()


@dataclass
class Case:
    """A model, its data and the quantfx config that is its baseline."""

    name: str
    model: nn.Module
    calibration: list[torch.Tensor]
    test_images: torch.Tensor
    test_labels: torch.Tensor | None
    base: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def _fashion_cases(progress: bool) -> list[Case]:
    calibration = [images for (images,) in calibration_loader()]
    test = load_fashion_mnist("test")
    recipe = train_float("mobilenetv2_style", progress=progress)
    untidy, info = train_float_with_info("mobilenetv2_norecipe", progress=progress,
                                         optimizer="adam", learning_rate=1e-3, weight_decay=0.0)
    return [
        Case("mobilenetv2_style, per-tensor depthwise", recipe, calibration, *test.tensors,
             base={"per_channel_depthwise": False}, note="TDA4VM's weight format"),
        Case("mobilenetv2_norecipe", untidy, calibration, *test.tensors,
             note=f"Adam lr 1e-3, no weight decay, {info.config['epochs']} epochs"),
    ]


def _onet_case() -> Case | str:
    """MTCNN's ONet (weights inside facenet-pytorch) on 48x48 crops of scikit-learn's photos."""
    try:
        from facenet_pytorch.models.mtcnn import ONet
        from sklearn.datasets import load_sample_images
    except ImportError as error:
        return f"skipped: {error} (pip install --no-deps facenet-pytorch==2.6.0 requests)"
    photos = load_sample_images().images
    generator = np.random.default_rng(0)
    crops = []
    for _ in range(ONET_CALIBRATION + ONET_TEST):
        photo = photos[generator.integers(len(photos))]
        size = int(generator.integers(48, 160))
        top = int(generator.integers(0, photo.shape[0] - size))
        left = int(generator.integers(0, photo.shape[1] - size))
        crop = torch.from_numpy(photo[top:top + size, left:left + size].copy())
        crop = crop.permute(2, 0, 1)[None].float()
        crop = nn.functional.interpolate(crop, size=(48, 48), mode="area")[0]
        crops.append((crop - 127.5) * 0.0078125)  # MTCNN's own normalization
    images = torch.stack(crops)
    calibration = list(images[:ONET_CALIBRATION].split(32))
    return Case("facenet-pytorch ONet (pretrained)", ONet().eval(), calibration,
                images[ONET_CALIBRATION:], None, note="crops of sklearn's china.jpg/flower.jpg")


def _outputs(model: Callable, images: torch.Tensor, batch: int = 500) -> list[torch.Tensor]:
    """Every output of `model` over `images`, each concatenated over batches."""
    parts: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            output = model(images[start:start + batch])
            output = list(output) if isinstance(output, (tuple, list)) else [output]
            parts.append([torch.as_tensor(value).float() for value in output])
    return [torch.cat(column) for column in zip(*parts)]


def _sqnr(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """Output SQNR in dB, each output weighted by its float power (so each counts alike)."""
    noise = sum(float((got - want).double().pow(2).mean() / want.double().pow(2).mean())
                for want, got in zip(reference, outputs))
    return 10.0 * np.log10(len(reference) / noise) if noise > 0 else float("inf")


def _decision(outputs: list[torch.Tensor]) -> torch.Tensor:
    return outputs[-1].argmax(1)  # logits; ONet's face probability is its last output


def _ort_model(path: Path, threads: int) -> Callable:
    session = onnxruntime_session(str(path), threads)
    name = session.get_inputs()[0].name
    return lambda images: [torch.from_numpy(value)
                           for value in session.run(None, {name: images.numpy()})]


def _brevitas_equalized(model: nn.Module) -> nn.Module:
    from brevitas.fx import symbolic_trace
    from brevitas.graph.equalize import EqualizeGraph

    return EqualizeGraph(iterations=20).apply(symbolic_trace(model))


def _qat_with(calibration: Callable, train: TensorDataset, schedule: qf.QATSchedule
              ) -> Callable[[], tuple[Callable, str]]:
    """One epoch of QAT from `calibration` (the default's, with `schedule` for QAT to read);
    learned thresholds train with Adam of their own (`benchmarks.accuracy.THRESHOLD_RATE`)."""

    def work() -> tuple[Callable, str]:
        calibration()
        note = ", ".join(f"{name}='{getattr(schedule, name)}'" for name in
                         ("ranges", "weight_exponent") if getattr(schedule, name) == "learned")
        return quantfx_qat(calibration.prepared, train), (
            f"QATSchedule({note}); thresholds: Adam lr {THRESHOLD_RATE}")
    return work


def _methods(case: Case, threads: int, folder: Path) -> list[tuple[str, Callable]]:
    """(label, work() -> (predictor, note)) for every method on `case`."""
    base = dict(case.base, progress=False)

    def ptc(**overrides: Any) -> Callable:
        def work() -> tuple[Callable, str]:
            config = qf.QuantConfig(**(base | overrides))
            prepared = qf.prepare(case.model, case.calibration[0][:1], config)
            qf.calibrate(prepared, case.calibration)
            work.prepared = prepared
            return qf.convert(prepared), ""
        return work

    default = ptc()
    methods = [
        ("quantfx default", default),
        ("quantfx, no equalization", ptc(equalization=False)),
        ("quantfx + equalization", ptc(equalization=True)),
        ("quantfx + equalization + learned rounding",
         ptc(equalization=True, weight_rounding="learned")),
        ("quantfx per-channel weights (every conv)",
         ptc(per_channel_weights=True, per_channel_depthwise=True)),
        ("quantfx 16-bit first layer", ptc(sixteen_bit_layers=("first",))),
    ]
    if case.test_labels is not None:
        train = load_fashion_mnist("train")
        methods.append(("quantfx QAT from default (1 epoch)",
                        lambda: (quantfx_qat(default.prepared, train), "")))
        for label, schedule in (
                ("learned ranges", qf.QATSchedule(ranges="learned")),
                ("learned ranges and weights", qf.QATSchedule(ranges="learned",
                                                              weight_exponent="learned"))):
            methods.append((f"quantfx QAT from default, {label} (1 epoch)",
                            _qat_with(ptc(qat_schedule=schedule), train, schedule)))
    methods.append(("torch.ao FX PTQ (x86)",
                    lambda: (torch_ao_ptq(case.model, case.calibration),
                             "affine uint8, per-channel weights")))

    def ort() -> tuple[Callable, str]:
        float_path, path = folder / "float.onnx", folder / "ort.onnx"
        export_float_onnx(case.model, float_path, (1, *case.calibration[0].shape[1:]))
        ort_quantize_static(float_path, path, "MinMax", True, case.calibration)
        return _ort_model(path, threads), "QDQ U8S8, per-channel weights"

    def brevitas() -> tuple[Callable, str]:
        try:
            equalized = _brevitas_equalized(case.model)
        except ImportError as error:
            raise RuntimeError(f"brevitas not installed here ({error})") from error
        prepared = qf.prepare(equalized, case.calibration[0][:1], qf.QuantConfig(**base))
        qf.calibrate(prepared, case.calibration)
        return qf.convert(prepared), "Brevitas EqualizeGraph(20 iterations)"

    return methods + [("ORT quantize_static MinMax", ort),
                      ("Brevitas equalization + quantfx PTC", brevitas)]


def _measure(case: Case, table: Table, threads: int) -> None:
    sqnr_images = case.test_images[:SQNR_IMAGES]
    reference = _outputs(case.model, sqnr_images)
    float_decisions = _decision(_outputs(case.model, case.test_images))
    labels = case.test_labels
    float_accuracy = (100.0 * float((float_decisions == labels).float().mean())
                      if labels is not None else None)
    table.add(case=case.name, method="float", **{"accuracy %": float_accuracy,
                                                 "note": case.note})
    with tempfile.TemporaryDirectory(prefix="quantfx-hard-") as folder:
        for label, work in _methods(case, threads, Path(folder)):
            start = time.perf_counter()
            try:
                predictor, note = work()
            except Exception as error:  # noqa: BLE001 - a failing method is a result
                table.add(case=case.name, method=label,
                          note=f"FAILED: {type(error).__name__}: {str(error)[:160]}")
                continue
            seconds = time.perf_counter() - start
            decisions = _decision(_outputs(predictor, case.test_images))
            row = {"agreement %": 100.0 * float((decisions == float_decisions).float().mean()),
                   "output SQNR dB": _sqnr(reference, _outputs(predictor, sqnr_images)),
                   "seconds": seconds, "note": note}
            if labels is not None:
                row["accuracy %"] = 100.0 * float((decisions == labels).float().mean())
                row["vs float (points)"] = row["accuracy %"] - float_accuracy
            table.add(case=case.name, method=label, **row)
            print(f"[hard_cases] {case.name} / {label}: {row}", flush=True)


def run(progress: bool = True) -> PartResult:
    """Every method on every hard case."""
    threads = configure_threads()
    table = Table("Hard cases for post-training quantization",
                  ["case", "method", "accuracy %", "vs float (points)", "agreement %",
                   "output SQNR dB", "seconds", "note"],
                  note=f"torch threads: {threads}. 'agreement': share of test inputs whose "
                       "top-1 (ONet: face / no face) equals float's. 'output SQNR': on "
                       f"{SQNR_IMAGES} test inputs, every output weighted by its float power. "
                       "'seconds': the method's own calibration / training.")
    cases: list[Case | str] = [*_fashion_cases(progress), _onet_case()]
    for case in cases:
        if isinstance(case, str):
            table.add(case="facenet-pytorch ONet (pretrained)", method="-", note=case)
            continue
        _measure(case, table, threads)
    return PartResult("hard_cases", DESCRIPTION, [table])


if __name__ == "__main__":
    from benchmarks.__main__ import main

    main(["hard_cases"])
