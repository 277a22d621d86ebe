"""The whole quantfx pipeline on real data, in a minute or two on a laptop CPU.

    python -m quantfx.demo            # Fashion-MNIST if installed, else scikit-learn's digits
    quantfx demo --dataset digits     # the same through the console entry point

A small CNN (conv + BN + ReLU blocks) is trained in float with fixed seeds, then prepared,
calibrated on a slice of the training set and converted; the table compares the float and the
quantized accuracy on the held-out test set. Stages whose API exists in this version of quantfx
(ONNX export, QAT) light up on their own.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

import quantfx as qf
from quantfx.errors import ConfigError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_APT_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Mean and standard deviation of the Fashion-MNIST training pixels (in [0, 1]): fixed constants
# so that every split (and every consumer of the data) normalizes the same way.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DATASETS = ("auto", "digits", "fashion-mnist")


# ----------------------------------------------------------------------------------------- data


def read_idx(path: Path) -> np.ndarray:
    """The array stored in one (optionally gzipped) IDX file, as used by MNIST-style data sets."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        data = stream.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes (bad magic number).")
    dimensions = data[3]
    shape = struct.unpack(f">{dimensions}I", data[4 : 4 + 4 * dimensions])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dimensions)
    if payload.size != math.prod(shape):
        raise ConfigError(f"{path} is truncated: header says {shape}, found {payload.size} bytes.")
    return payload.reshape(shape)


def fashion_mnist_dir(data_dir: str | os.PathLike | None) -> Path:
    """The folder holding the four Fashion-MNIST IDX files, or a `ConfigError` saying how to
    get them."""
    folder = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    wanted = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    missing = [name for name in wanted if not (folder / name).is_file()]
    if missing:
        where = "the folder given with --data-dir" if data_dir is not None else "the default folder"
        raise ConfigError(
            f"Fashion-MNIST not found: {where} {folder} lacks {', '.join(missing)}. Install it "
            f"with `apt-get install {FASHION_MNIST_APT_PACKAGE}` (files land in "
            f"{FASHION_MNIST_DIR}), or pass --data-dir pointing at a folder with the four "
            f"IDX gz files ({', '.join(wanted)})."
        )
    return folder


def load_fashion_mnist_tensors(
    split: str, data_dir: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST `split` ("train" or "test"): normalized N x 1 x 28 x 28 floats, int64
    labels."""
    if split not in FASHION_MNIST_FILES:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}.")
    folder = fashion_mnist_dir(data_dir)
    image_file, label_file = FASHION_MNIST_FILES[split]
    images = read_idx(folder / image_file)
    labels = read_idx(folder / label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ConfigError(
            f"{folder}: {image_file} has shape {images.shape} and {label_file} {labels.shape}; "
            "expected N x 28 x 28 images and N labels."
        )
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    pixels = (pixels - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return pixels.contiguous(), torch.from_numpy(labels.astype(np.int64))


def load_digits_tensors(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 handwritten digits, split (stratified, seeded) into train/test."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ConfigError(
            "the digits data set comes with scikit-learn, which is not installed: "
            "`pip install quantfx[demo]` (or give Fashion-MNIST with --data-dir)."
        ) from error
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    mean, std = float(train_x.mean()), float(train_x.std())

    def to_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        tensor = torch.from_numpy((x - mean) / std).unsqueeze(1).contiguous()
        return TensorDataset(tensor, torch.from_numpy(y.astype(np.int64)))

    return to_dataset(train_x, train_y), to_dataset(test_x, test_y)


@dataclass
class DemoData:
    """A train/test split, with what the table needs to say about it."""

    name: str
    train: TensorDataset
    test: TensorDataset

    @property
    def image_size(self) -> int:
        return int(self.train.tensors[0].shape[-1])


def load_demo_data(dataset: str = "auto", data_dir: str | None = None, seed: int = 0) -> DemoData:
    """Fashion-MNIST when asked for (or installed and `dataset` is "auto"), else the digits."""
    if dataset not in DATASETS:
        raise ConfigError(f"dataset must be one of {DATASETS}, got {dataset!r}.")
    if dataset == "digits" and data_dir is not None:
        raise ConfigError("--data-dir names Fashion-MNIST files; it cannot be used with digits.")
    use_fashion = dataset == "fashion-mnist" or (
        dataset == "auto" and (data_dir is not None or FASHION_MNIST_DIR.is_dir())
    )
    if use_fashion:
        train = TensorDataset(*load_fashion_mnist_tensors("train", data_dir))
        test = TensorDataset(*load_fashion_mnist_tensors("test", data_dir))
        return DemoData("Fashion-MNIST", train, test)
    train, test = load_digits_tensors(seed)
    return DemoData("digits (scikit-learn)", train, test)


# ---------------------------------------------------------------------------------------- model


def conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 conv + BatchNorm + ReLU: one fused layer for the engine (BN after every conv)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DemoNet(nn.Module):
    """A small CNN for 1-channel images: conv-BN-ReLU blocks, global average pool, linear."""

    def __init__(self, image_size: int, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        first_stride = 2 if image_size >= 16 else 1  # 28x28: halve at once, keeps it cheap
        blocks = [conv_block(1, width, first_stride)]
        channels, size = width, (image_size + first_stride - 1) // first_stride
        while size > 4:  # halve 14 -> 7 -> 4, or 8 -> 4
            blocks.append(conv_block(channels, channels * 2, 2))
            channels, size = channels * 2, (size + 1) // 2
        blocks.append(conv_block(channels, channels, 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# ------------------------------------------------------------------------------------- training


def seed_everything(seed: int) -> None:
    """Fix the seeds that training and data order depend on."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def train_epochs(
    model: nn.Module,
    data: TensorDataset,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> nn.Module:
    """Train with TI's recipe: SGD momentum 0.9, weight decay 1e-4 on every parameter, cosine LR."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=learning_rate, momentum=0.9, weight_decay=1e-4
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    loss_function = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        batches = tqdm(loader, desc=f"train epoch {epoch + 1}/{epochs}", unit="batch",
                       leave=False, disable=None if progress else True)
        for images, labels in batches:
            optimizer.zero_grad(set_to_none=True)
            loss_function(model(images), labels).backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@torch.no_grad()
def predict(
    model: nn.Module | Callable, data: TensorDataset, batch_size: int = 256
) -> torch.Tensor:
    """Top-1 predictions of `model` over `data`, in order."""
    if isinstance(model, nn.Module):
        model.eval()
    images = data.tensors[0]
    return torch.cat(
        [model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]
    )


def accuracy_of(predictions: torch.Tensor, data: TensorDataset) -> float:
    """Share of `predictions` equal to the labels of `data`."""
    return float((predictions == data.tensors[1]).float().mean())


# ----------------------------------------------------------------------------------------- demo


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
            f"{'stage':<34} {'accuracy':>9} {'time (s)':>9}  note",
            f"{'-' * 34} {'-' * 9} {'-' * 9}  {'-' * 30}",
        ]
        for row in self.stages:
            accuracy = f"{100 * row.accuracy:8.2f}%" if row.accuracy is not None else "-"
            note = f"FAILED: {row.error}" if row.error else row.note
            lines.append(f"{row.stage:<34} {accuracy:>9} {row.seconds:9.2f}  {note}")
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

    Returns the measurements (the printed table is `result.table()`). Optional stages (ONNX
    export with ONNX Runtime accuracy, QAT) run when this quantfx version provides them.
    """
    if epochs is not None and epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}.")
    if calibration_images < 1:
        raise ConfigError(f"calibration_images must be at least 1, got {calibration_images}.")
    torch.set_num_threads(max(1, min(threads, 2)))
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

    if hasattr(qf, "export_onnx"):
        _export_stages(stages, converted, example, data, quantized_predictions)
    if hasattr(qf, "prepare_qat") and qat_epochs > 0:
        _qat_stages(stages, float_model, example, data, config, qat_epochs, batch_size, seed)

    if verbose:
        print(result.table())
    return result


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
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = max(1, torch.get_num_threads())
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
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


def main(argv: list[str] | None = None) -> int:
    """`python -m quantfx.demo`: the same as `quantfx demo`."""
    from quantfx.cli import main as cli_main

    return cli_main(["demo", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
