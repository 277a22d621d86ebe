"""Data sets the demo and the benchmarks share: Fashion-MNIST from its IDX files (the Debian
package `dataset-fashion-mnist`, or any folder holding the four files) and scikit-learn's
bundled 8x8 digits (no download), as normalized tensors.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from quantfx.arguments import DEMO_DATASETS as DATASETS
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
    if folder.is_file():
        raise ConfigError(f"--data-dir {folder} is a file; give the folder that holds the four "
                          "Fashion-MNIST IDX gz files.")
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
