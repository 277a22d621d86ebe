"""A Keras-style CIFAR-10 CNN ported to PyTorch, with weights trained the way Keras code bases do.

A hard real-model case for the quantizer: raw 0..255 RGB input (no normalization), every
BatchNorm *after* its ReLU (Keras `Conv2D(activation="relu")` then `BatchNormalization()`, eps
1e-3, momentum 0.99), valid padding, MaxPool between stages, a ReLU on the logits, Keras' default
init (Glorot-uniform kernels, zero biases) and Adam at 1e-3 without weight decay. CIFAR-10 is not
available offline, so the data are Fashion-MNIST padded to 32 x 32 and colourized per image.

The trained weights are cached like `benchmarks.training`: under `CACHE_DIR`, keyed by a hash of
this code, the data reader, the config and the torch version, written atomically.

    python -m benchmarks.keras_style     # trains once (a few minutes), prints the BN statistics
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.training import CACHE_DIR, configure_threads, evaluate, train_epochs
from quantfx.demo import datasets as datasets_module
from quantfx.demo.datasets import FASHION_MNIST_FILES, fashion_mnist_dir, read_idx

NAME = "keras_cifar_cnn"
COLOUR_SEEDS = {"train": 1234, "test": 5678}
"""One generator seed per split: the test split is colourized the same way, independently."""
KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01
"""Keras' BatchNormalization(momentum=0.99) is PyTorch's momentum 0.01."""
DEAD_VARIANCE = 1e-4


@dataclass(frozen=True)
class KerasTrainConfig:
    """Everything that decides the trained weights (part of the cache key)."""

    train_images: int = 30000
    epochs: int = 3
    batch_size: int = 64
    learning_rate: float = 1e-3
    adam_eps: float = 1e-7
    """Keras' Adam epsilon (PyTorch's default is 1e-8)."""
    seed: int = 0


# ---------------------------------------------------------------------------------------- model


def _block(in_channels: int, out_channels: int, padding: str = "valid") -> list[nn.Module]:
    """Keras `Conv2D(3x3, activation="relu", padding=...)` followed by `BatchNormalization()`."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=padding),
        nn.ReLU(),
        nn.BatchNorm2d(out_channels, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM),
    ]


def _keras_init(module: nn.Module) -> None:
    """Keras' defaults: Glorot-uniform kernels and zero biases for Conv2D and Dense."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


def keras_cifar_cnn(num_classes: int = 10) -> nn.Module:
    """The CNN: 32x32x3 (0..255) -> [conv-relu-bn]x2 -> pool -> [conv-relu-bn]x2 -> pool -> MLP.

    The second conv is 'same'-padded and follows a BatchNorm directly; the logits go through ReLU.
    """
    model = nn.Sequential(
        *_block(3, 32),            # 30 x 30
        *_block(32, 32, "same"),   # 30 x 30
        nn.MaxPool2d(2),           # 15 x 15: BN -> MaxPool -> Conv
        *_block(32, 64),           # 13 x 13
        *_block(64, 64),           # 11 x 11
        nn.MaxPool2d(2),           # 5 x 5
        nn.Flatten(),
        nn.Linear(64 * 5 * 5, 512),
        nn.ReLU(),
        nn.BatchNorm1d(512, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
        nn.ReLU(),
    )
    model.apply(_keras_init)
    return model


# ----------------------------------------------------------------------------------------- data


def _raw_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` as stored: N x 28 x 28 uint8 images and N uint8 labels."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = fashion_mnist_dir(None)
    image_file, label_file = FASHION_MNIST_FILES[split]
    return read_idx(folder / image_file), read_idx(folder / label_file)


def colour_fashion_mnist(split: str, count: int | None = None) -> TensorDataset:
    """Fashion-MNIST as CIFAR-like data: N x 3 x 32 x 32 floats in 0..255, int64 labels. Padded
    28 -> 32, each image mixes a seeded random background and foreground colour (>= 0.1 apart
    per channel, dark-on-light or light-on-dark) by its grey level; `count` keeps the first N."""
    images, labels = _raw_fashion_mnist(split)
    images, labels = images[:count], labels[:count]
    generator = torch.Generator().manual_seed(COLOUR_SEEDS[split])
    n = len(images)
    dark = torch.rand(n, 3, 1, 1, generator=generator) * 0.45
    light = 0.55 + torch.rand(n, 3, 1, 1, generator=generator) * 0.45
    swap = torch.rand(n, 1, 1, 1, generator=generator) < 0.5
    background = torch.where(swap, light, dark)
    foreground = torch.where(swap, dark, light)
    grey = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    grey = nn.functional.pad(grey, (2, 2, 2, 2))
    rgb = (background * (1.0 - grey) + foreground * grey) * 255.0
    return TensorDataset(rgb.contiguous(), torch.from_numpy(labels.astype(np.int64)))


# ------------------------------------------------------------------------------------- training


def _source_hash(config: KerasTrainConfig) -> str:
    """Hash of this code, the IDX reader, the config and torch's version (the cache key)."""
    digest = hashlib.sha256()
    digest.update(inspect.getsource(sys.modules[__name__]).encode())
    for function in (datasets_module.read_idx, datasets_module.fashion_mnist_dir, train_epochs):
        digest.update(inspect.getsource(function).encode())
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update(torch.__version__.split("+")[0].encode())
    return digest.hexdigest()[:16]


def _fit(model: nn.Module, train: TensorDataset, config: KerasTrainConfig, progress: bool) -> None:
    """Keras-style `fit`: Adam at a constant learning rate, no weight decay, shuffled batches."""
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(train, batch_size=config.batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=config.adam_eps)
    train_epochs(model, loader, optimizer, config.epochs, NAME, progress)


def trained_keras_cnn_with_info(
    progress: bool = True, config: KerasTrainConfig | None = None, use_cache: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """`trained_keras_cnn`, also returning the training record (seconds, test accuracy, ...)."""
    config = config or KerasTrainConfig()
    key = _source_hash(config)
    path = CACHE_DIR / f"{NAME}-{key}.pt"
    model = keras_cifar_cnn()
    if use_cache and path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(stored["state_dict"])
        return model.eval(), {**stored["info"], "cached": True}
    threads = configure_threads()
    torch.manual_seed(config.seed)
    model = keras_cifar_cnn()
    start = time.perf_counter()
    _fit(model, colour_fashion_mnist("train", config.train_images), config, progress)
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, colour_fashion_mnist("test"))
    info = {"config": asdict(config), "key": key, "seconds": seconds,
            "test_accuracy": accuracy, "threads": threads, "cached": False}
    if use_cache:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        torch.save({"state_dict": model.state_dict(), "info": info}, partial)
        partial.replace(path)  # atomic: a killed run never leaves a half-written cache entry
    return model, info


def trained_keras_cnn(progress: bool = True) -> nn.Module:
    """The Keras-style CNN trained on coloured Fashion-MNIST (cached after the first run), in eval
    mode."""
    model, _ = trained_keras_cnn_with_info(progress)
    return model


# ----------------------------------------------------------------------------------- statistics


def bn_statistics(model: nn.Module) -> list[dict[str, Any]]:
    """Per BatchNorm: channel count, channels with running_var < 1e-4, and the spread of the
    per-channel scale |gamma| / sqrt(var + eps)."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        variance = module.running_var.detach()
        scale = (module.weight.detach().abs() / torch.sqrt(variance + module.eps))
        rows.append({
            "name": name, "channels": len(variance),
            "dead": int((variance < DEAD_VARIANCE).sum()),
            "scale_min": float(scale.min()), "scale_median": float(scale.median()),
            "scale_max": float(scale.max()), "max_over_median": float(scale.max() / scale.median()),
        })
    return rows


def main() -> None:
    """Train (or load) the model and print its accuracy and BatchNorm statistics."""
    model, info = trained_keras_cnn_with_info()
    print(f"trained in {info['seconds']:.0f} s on {info['threads']} thread(s) "
          f"(cached: {info['cached']}); test accuracy {info['test_accuracy']:.4f}")
    for row in bn_statistics(model):
        print(f"{row['name']:>3} {row['channels']:4d} ch, {row['dead']:3d} var<1e-4, scale "
              f"min {row['scale_min']:.3g} median {row['scale_median']:.3g} "
              f"max {row['scale_max']:.3g} (max/median {row['max_over_median']:.3g})")


if __name__ == "__main__":
    main()
