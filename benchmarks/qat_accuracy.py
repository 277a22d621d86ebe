"""Fashion-MNIST accuracy of a MobileNetV2-style model: float, PTC, and PTC/float + short QAT.

Float training follows the seed's guidelines (SGD, weight decay 1e-4 on every parameter, BN
after every conv); the float weights are cached. Then:

- PTC: `prepare` + `calibrate` (histogram, MSE exponent search) on 1000 training images.
- QAT from float: `prepare_qat` on the float model (EMA min/max ranges), a few epochs at low LR.
- QAT from PTC: `prepare_qat` on the calibrated model (BN stays folded, ranges start at the
  calibrated exponents and then follow the EMA), same fine-tune.
- QAT from PTC, frozen ranges: as above but the histogram/MSE ranges stay fixed (measures
  whether QAT's running-average ranges beat searched-and-frozen ones).

All quantized accuracies are of the converted (integer-exact) model; the QAT model's own
eval() is checked to agree with it on the first test batch.

    /work/venv/bin/python benchmarks/qat_accuracy.py [--float-epochs 4] [--qat-epochs 2]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import math
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import quantfx as qf

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantfx"


# ---------------------------------------------------------------------------- data


def load_split(split: str) -> TensorDataset:
    """Fashion-MNIST `split` ("train"/"test"), normalized; the shared loader when present."""
    try:
        from benchmarks.data import load_fashion_mnist

        return load_fashion_mnist(split)
    except ImportError:
        pass
    prefix = "train" if split == "train" else "t10k"

    def read(name: str) -> torch.Tensor:
        with gzip.open(DATA_DIR / name, "rb") as handle:
            data = handle.read()
        dims = data[3]
        shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
        return torch.frombuffer(bytearray(data[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)

    images = read(f"{prefix}-images-idx3-ubyte.gz").float().div(255.0).unsqueeze(1)
    labels = read(f"{prefix}-labels-idx1-ubyte.gz").long()
    return TensorDataset((images - 0.2860) / 0.3530, labels)


# ---------------------------------------------------------------------------- model


def conv_bn(inputs: int, outputs: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            relu: bool = True) -> list[nn.Module]:
    """conv (no bias) + BN (+ ReLU6): BN after every conv, per the QAT guidelines."""
    layers: list[nn.Module] = [
        nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(outputs),
    ]
    return layers + [nn.ReLU6()] if relu else layers


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual add."""

    def __init__(self, inputs: int, outputs: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inputs * expand
        self.body = nn.Sequential(
            *conv_bn(inputs, hidden),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden),
            *conv_bn(hidden, outputs, relu=False),
        )
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def mobilenetv2_style(num_classes: int = 10) -> nn.Module:
    """A small MobileNetV2 for 1x28x28 inputs (depthwise-heavy: the hard case for PTC)."""
    blocks = [(16, 16, 1), (16, 24, 2), (24, 24, 1), (24, 48, 1), (48, 48, 1)]
    return nn.Sequential(
        *conv_bn(1, 16, 3, stride=2),  # 14x14
        *[InvertedResidual(i, o, s, expand=3) for i, o, s in blocks],  # down to 7x7
        *conv_bn(48, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


# ---------------------------------------------------------------------------- training


def train(model: nn.Module, data: TensorDataset, epochs: int, lr: float, batch: int,
          seed: int, on_epoch_end: Callable[[], None] | None = None) -> None:
    """SGD + momentum, weight decay 1e-4 on every parameter, cosine LR, random flips."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=generator, drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    model.train()
    for epoch in range(epochs):
        start, seen, loss_sum = time.perf_counter(), 0, 0.0
        for images, labels in loader:
            flip = torch.rand(images.shape[0], generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += 1
            loss_sum += loss.item()
        if on_epoch_end is not None:
            on_epoch_end()
        print(f"    epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, batch: int = 500) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for images, labels in DataLoader(data, batch_size=batch):
        correct += int((model(images).argmax(1) == labels).sum())
    return 100.0 * correct / len(data)


def float_model(train_data: TensorDataset, epochs: int, seed: int) -> nn.Module:
    """The trained float model, from the cache when it holds one for these settings."""
    path = CACHE_DIR / f"qat_accuracy_mobilenetv2_style_e{epochs}_s{seed}.pt"
    torch.manual_seed(seed)
    model = mobilenetv2_style()
    if path.exists():
        model.load_state_dict(torch.load(path))
        print(f"float model from cache {path}")
        return model.eval()
    print(f"training the float model ({epochs} epochs)")
    train(model, train_data, epochs, lr=0.1, batch=128, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def qat_finetune(qat_model: nn.Module, train_data: TensorDataset, test_data: TensorDataset,
                 epochs: int, lr: float, seed: int) -> float:
    """Fine-tune with QAT, convert, return the converted model's accuracy."""
    train(qat_model, train_data, epochs, lr=lr, batch=128, seed=seed + 1,
          on_epoch_end=lambda: qf.end_qat_epoch(qat_model))
    qat_model.eval()
    converted = qf.convert(qat_model)
    first = test_data.tensors[0][:500]
    with torch.no_grad():
        assert torch.equal(qat_model(first), converted(first)), "QAT eval != converted"
    return accuracy(converted, test_data)


def main() -> None:
    """Train (or load) the float model, then report float / PTC / QAT test accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float-epochs", type=int, default=4)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--qat-lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["float", "ptc", "ptc_frozen"],
                        help="QAT variants: float (QAT from float), ptc, ptc_frozen")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_data, test_data = load_split("train"), load_split("test")
    model = float_model(train_data, args.float_epochs, args.seed)
    example = train_data.tensors[0][:1]
    results = {"float": accuracy(model, test_data)}
    print(f"float: {results['float']:.2f}%", flush=True)

    calibration = [train_data.tensors[0][i:i + 100] for i in range(0, 1000, 100)]
    prepared = qf.prepare(model, example, qf.QuantConfig(progress=False))
    qf.calibrate(prepared, calibration)
    results["PTC"] = accuracy(qf.convert(prepared), test_data)
    print(f"PTC: {results['PTC']:.2f}%", flush=True)

    steps_per_epoch = len(train_data) // 128
    schedule = qf.QATSchedule(freeze_bn_epoch=max(args.qat_epochs - 1, 0),
                              freeze_ranges_step=int((args.qat_epochs - 0.5) * steps_per_epoch))
    config = qf.QuantConfig(progress=False, qat_schedule=schedule)
    for variant in args.variants:
        start = time.perf_counter()
        if variant == "float":
            qat_model = qf.prepare_qat(model, example, config)
            label = "QAT from float"
        else:
            ptc = qf.prepare(model, example, config)
            qf.calibrate(ptc, calibration)
            qat_model = qf.prepare_qat(ptc, example)
            label = "QAT from PTC"
            if variant == "ptc_frozen":
                qf.qat.freeze_ranges(qat_model)
                label += ", frozen PTC ranges"
        print(f"{label}: fine-tuning {args.qat_epochs} epochs at lr {args.qat_lr}", flush=True)
        results[label] = qat_finetune(copy.deepcopy(qat_model), train_data, test_data,
                                      args.qat_epochs, args.qat_lr, args.seed)
        print(f"{label}: {results[label]:.2f}% ({time.perf_counter() - start:.0f} s)", flush=True)

    print("\nFashion-MNIST test accuracy (10k images), MobileNetV2-style, int8 power-of-2:")
    for label, value in results.items():
        delta = "" if label == "float" else f"  ({value - results['float']:+.2f} vs float)"
        print(f"  {label:<36}{value:6.2f}%{delta}")


if __name__ == "__main__":
    main()
