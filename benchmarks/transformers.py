"""Part `transformers`: vision transformers quantized the way TIDL runs them, and the peers.

Three nets trained here on Fashion-MNIST with Adam (cached like the others): `vit_style`
(DeiT-tiny's shape scaled down to 28x28: 49 patch tokens and a class token, four blocks of
torchvision's ViT encoder, 64 wide, 4 heads), `swin_style` (torchvision's Swin V1: 2x2 patches,
7x7 windows shifted by 3 in every second block, two stages of two blocks, 32 and 64 wide) and
`swinv2_style` (the same with Swin V2 blocks: cosine attention, a learned scale per head, the
MLP position bias). quantfx decomposes nn.MultiheadAttention and Swin's window attention into
Linear projections (8-bit weights), MatMuls and a Softmax with every tensor between them
quantized (docs/transformers.md). Rows: float; quantfx PTC default for the generic runtime,
TDA4VM and AM68A (each exported and checked with `check_tidl` for its device); the generic
export run in ONNX Runtime; one epoch of QAT from the PTC default; torch.ao FX PTQ (x86) and
ONNX Runtime's `quantize_static` (MinMax, per-tensor and per-channel). Accuracy on the 10k test
images, top-1 agreement with float, output SQNR against float (logits of the test images).

    python -m benchmarks transformers
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import quantfx as qf
from benchmarks.accuracy import (
    EVAL_BATCH,
    QAT_EPOCHS,
    accuracy,
    export_float_onnx,
    ort_quantize_static,
    quantfx_ptc,
    quantfx_qat,
    torch_ao_ptq,
)
from benchmarks.data import load_fashion_mnist
from benchmarks.report import PartResult, Table
from benchmarks.training import configure_threads, train_float_with_info
from quantfx.export.verify import onnxruntime_session

MODELS = ("vit_style", "swin_style", "swinv2_style")
EPOCHS, LEARNING_RATE = 4, 0.002
"""Adam at 2e-3, cosine, no weight decay (ViT: 86.6 % float after 4 epochs, 5 minutes on one
thread)."""

DESCRIPTION = __doc__.split("\n\n    python")[0].strip()
Predictor = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def _logits(predictor: Predictor, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([predictor(images[start:start + EVAL_BATCH])
                      for start in range(0, len(images), EVAL_BATCH)])


def _ort_predictor(path: Path, threads: int) -> Predictor:
    session = onnxruntime_session(str(path), threads=threads)
    name = session.get_inputs()[0].name
    return lambda images: torch.from_numpy(session.run(None, {name: images.numpy()})[0])


def _ptc(model: torch.nn.Module, target: str, folder: Path, example: torch.Tensor
         ) -> Callable[[], tuple[Predictor, str]]:
    """PTC for `target`, exported at `example`'s shape (and verified on it) to
    `folder/quantfx-{target}.onnx`; the note is check_tidl's summary for the device (the
    export's own verification for the generic runtime)."""
    def work() -> tuple[Predictor, str]:
        _, converted = quantfx_ptc(model, qf.QuantConfig(target=target, progress=False))
        path = folder / f"quantfx-{target}.onnx"
        report = qf.export_onnx(converted, (example,), path)
        if target != "generic":
            return converted, qf.check_tidl(path, target).summary()
        return converted, f"export verified: max {report.max_lsb_diff:g} LSB"
    return work


def _methods(model: torch.nn.Module, train: TensorDataset, test: TensorDataset, folder: Path,
             threads: int) -> list[tuple[str, Callable[[], tuple[Predictor, str]]]]:
    float_path = folder / "float.onnx"
    example = test.tensors[0][:EVAL_BATCH]  # the ORT row runs the file in batches of this size

    def ort_static(per_channel: bool) -> Callable[[], tuple[Predictor, str]]:
        def work() -> tuple[Predictor, str]:
            if not float_path.exists():
                export_float_onnx(model, float_path)
            path = folder / f"ort-{per_channel}.onnx"
            ort_quantize_static(float_path, path, "MinMax", per_channel)
            return _ort_predictor(path, threads), "QDQ U8S8, MinMax"
        return work

    def qat() -> tuple[Predictor, str]:
        prepared, _ = quantfx_ptc(model, qf.QuantConfig(progress=False))
        return quantfx_qat(prepared, train), f"{QAT_EPOCHS} epoch(s) from PTC default"

    return [
        ("quantfx PTC default (generic)", _ptc(model, "generic", folder, example)),
        ("ORT on quantfx export (generic)",
         lambda: (_ort_predictor(folder / "quantfx-generic.onnx", threads),
                  "the file export_onnx wrote, run as written")),
        ("quantfx PTC default (tda4vm)", _ptc(model, "tda4vm", folder, example)),
        ("quantfx PTC default (am68a)", _ptc(model, "am68a", folder, example)),
        ("quantfx QAT", qat),
        ("torch.ao FX PTQ (x86)", lambda: (torch_ao_ptq(model), "per-channel weights, affine")),
        ("ORT quantize_static per-tensor", ort_static(False)),
        ("ORT quantize_static per-channel", ort_static(True)),
    ]


def _sqnr(reference: torch.Tensor, logits: torch.Tensor) -> float:
    error = (reference - logits).double().pow(2).sum()
    return float(10 * torch.log10(reference.double().pow(2).sum() / error.clamp_min(1e-30)))


def _measure(name: str, train: TensorDataset, test: TensorDataset, threads: int,
             progress: bool) -> Table:
    """Train (or load) model `name`, then one row per method."""
    model, info = train_float_with_info(name, EPOCHS, learning_rate=LEARNING_RATE,
                                        optimizer="adam", weight_decay=0.0, progress=progress)
    images = test.tensors[0]
    reference = _logits(model, images)
    float_accuracy = accuracy(reference.argmax(1), test)
    table = Table(f"{name}: 8-bit attention on Fashion-MNIST (10k test images)",
                  ["method", "accuracy %", "vs float (points)", "agreement %",
                   "output SQNR dB", "seconds", "note"],
                  note=f"torch threads: {threads}; 'seconds' is the method's own work.")
    table.add(method="float", **{"accuracy %": float_accuracy, "seconds": info.seconds,
                                 "note": f"{EPOCHS} epochs Adam" + (" (cached)" if info.cached
                                                                    else "")})
    with tempfile.TemporaryDirectory(prefix="quantfx-bench-") as folder:
        for method, work in _methods(model, train, test, Path(folder), threads):
            start = time.perf_counter()
            try:
                predictor, note = work()
                logits = _logits(predictor, images)
            except Exception as error:  # noqa: BLE001 - a failing method is a result
                table.add(method=method, note=f"FAILED: {type(error).__name__}: "
                                              f"{str(error).splitlines()[0][:160]}")
                continue
            value = accuracy(logits.argmax(1), test)
            table.add(method=method, **{
                "accuracy %": value, "vs float (points)": value - float_accuracy,
                "agreement %": 100.0 * float((logits.argmax(1) == reference.argmax(1))
                                             .float().mean()),
                "output SQNR dB": _sqnr(reference, logits),
                "seconds": time.perf_counter() - start, "note": note})
    return table


def run(progress: bool = True) -> PartResult:
    """One table per transformer."""
    threads = configure_threads()
    test, train = load_fashion_mnist("test"), load_fashion_mnist("train")
    tables = [_measure(name, train, test, threads, progress) for name in MODELS]
    return PartResult("transformers", DESCRIPTION, tables, [])
