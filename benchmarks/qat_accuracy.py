"""Fashion-MNIST accuracy of a MobileNetV2-style model: float, PTC, and PTC/float + short QAT.

The float model is `benchmarks.models.mobilenetv2_style`, trained (and cached) by
`benchmarks.training.train_float` per the seed's guidelines (SGD, weight decay 1e-4 on every
parameter, BN after every conv). Then:

- PTC: `prepare` + `calibrate` (histogram, MSE exponent search) on 1000 training images.
- QAT from float: `prepare_qat` on the float model (EMA min/max ranges), a few epochs at low LR.
- QAT from PTC: `prepare_qat` on the calibrated model (BN stays folded, ranges start at the
  calibrated exponents and then follow the EMA), same fine-tune.
- QAT from PTC, frozen ranges: as above but the histogram/MSE ranges stay fixed (measures
  whether QAT's running-average ranges beat searched-and-frozen ones).

All quantized accuracies are of the converted (integer-exact) model; the QAT model's own
eval() is checked to agree with it bit for bit on the first 500 test images.

    /work/venv/bin/python -m benchmarks.qat_accuracy [--model mobilenetv2_style] [--qat-epochs 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import quantfx as qf
from benchmarks.data import calibration_subset, load_fashion_mnist
from benchmarks.training import DEFAULT_EPOCHS, configure_threads, evaluate, train_float


def train(model: nn.Module, data: TensorDataset, epochs: int, lr: float, batch: int,
          seed: int, on_epoch_end: Callable[[], None] | None = None) -> None:
    """The user's QAT loop: SGD + momentum, weight decay 1e-4 on every parameter, cosine LR."""
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


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * evaluate(model, data)


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
    parser.add_argument("--model", default="mobilenetv2_style")
    parser.add_argument("--float-epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--qat-lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-clip-std", type=float, default=4.0,
                        help="QATSchedule.weight_clip_std (one-time clip of folded weights)")
    parser.add_argument("--per-tensor-depthwise", action="store_true",
                        help="one weight scale per depthwise layer (TDA4VM-style), the hard case")
    parser.add_argument("--variants", nargs="+", default=["float", "ptc", "ptc_frozen"],
                        help="QAT variants: float (QAT from float), ptc, ptc_frozen")
    args = parser.parse_args()
    threads = configure_threads()
    train_data, test_data = load_fashion_mnist("train"), load_fashion_mnist("test")
    model = train_float(args.model, args.float_epochs, seed=args.seed, progress=False)
    example = train_data.tensors[0][:1]
    print(f"{args.model}, {threads} thread(s)")
    results = {"float": accuracy(model, test_data)}
    print(f"float: {results['float']:.2f}%", flush=True)

    images = calibration_subset(1000).tensors[0]
    calibration = [images[i:i + 100] for i in range(0, len(images), 100)]
    base = qf.QuantConfig(progress=False, per_channel_depthwise=not args.per_tensor_depthwise)
    prepared = qf.prepare(model, example, base)
    qf.calibrate(prepared, calibration)
    results["PTC"] = accuracy(qf.convert(prepared), test_data)
    print(f"PTC: {results['PTC']:.2f}%", flush=True)

    steps_per_epoch = len(train_data) // 128
    schedule = qf.QATSchedule(freeze_bn_epoch=max(args.qat_epochs - 1, 0),
                              freeze_ranges_step=int((args.qat_epochs - 0.5) * steps_per_epoch),
                              weight_clip_std=args.weight_clip_std)
    config = dataclasses.replace(base, qat_schedule=schedule)
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
        results[label] = qat_finetune(qat_model, train_data, test_data,
                                      args.qat_epochs, args.qat_lr, args.seed)
        print(f"{label}: {results[label]:.2f}% ({time.perf_counter() - start:.0f} s)", flush=True)

    depthwise = "per-tensor" if args.per_tensor_depthwise else "per-channel"
    print(f"\nFashion-MNIST test accuracy (10k images), {args.model}, int8 power-of-2, "
          f"{depthwise} depthwise weights:")
    for label, value in results.items():
        delta = "" if label == "float" else f"  ({value - results['float']:+.2f} vs float)"
        print(f"  {label:<36}{value:6.2f}%{delta}")


if __name__ == "__main__":
    main()
