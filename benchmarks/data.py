"""Fashion-MNIST from the four IDX gz files of the Debian package `dataset-fashion-mnist`."""

from __future__ import annotations

import os

from torch.utils.data import TensorDataset

from quantfx.demo.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist_tensors,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "calibration_subset",
    "load_fashion_mnist",
]

_CACHE: dict[tuple[str, str | None], TensorDataset] = {}


def load_fashion_mnist(split: str, data_dir: str | os.PathLike | None = None) -> TensorDataset:
    """Fashion-MNIST `split` ("train" 60k, "test" 10k): N x 1 x 28 x 28 normalized floats, int64
    labels.

    Reads `data_dir` (default /usr/share/datasets/fashion-mnist); a missing file raises a
    `quantfx.ConfigError` naming `--data-dir` and the apt package. Results are memoized.
    """
    key = (split, os.fspath(data_dir) if data_dir is not None else None)
    if key not in _CACHE:
        _CACHE[key] = TensorDataset(*load_fashion_mnist_tensors(split, data_dir))
    return _CACHE[key]


def calibration_subset(
    count: int = 1000, data_dir: str | os.PathLike | None = None
) -> TensorDataset:
    """The fixed calibration set: the first `count` training images (the split is pre-shuffled)."""
    images, labels = load_fashion_mnist("train", data_dir).tensors
    return TensorDataset(images[:count], labels[:count])
