"""Float training of the benchmark nets on Fashion-MNIST, cached on disk, and evaluation.

The recipe follows TI's QAT guidelines for the float model too: SGD with momentum 0.9, weight
decay 1e-4 on *every* parameter (biases and BN included), cosine learning rate, fixed seeds.
A trained model is stored under `.cache/quantfx-bench/`, keyed by a hash of this code, the model
code, the data code and the config, so a second run (or another engineer's script) skips training.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from benchmarks import data as data_module
from benchmarks import models as models_module
from benchmarks.data import load_fashion_mnist
from benchmarks.models import build_model
from quantfx.demo import datasets as datasets_module

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("QUANTFX_BENCH_CACHE", REPO_ROOT / ".cache" / "quantfx-bench"))
DEFAULT_EPOCHS = 4


def configure_threads() -> int:
    """Set torch's CPU threads from QUANTFX_BENCH_THREADS (default 1, at most 2) and return it.

    One thread is the default: on a busy shared 2-core machine, two threads ran convolutions
    several times slower than one (threads waiting for each other's time slices).
    """
    threads = max(1, min(2, int(os.environ.get("QUANTFX_BENCH_THREADS", "1"))))
    torch.set_num_threads(threads)
    return threads


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (part of the cache key)."""

    name: str
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    optimizer: str = "sgd"
    """"sgd" (TI's recipe) or "adam" (a hard case); the same cosine schedule for both."""


@dataclass
class TrainInfo:
    """What a training run recorded (stored next to the weights in the cache)."""

    config: dict[str, Any]
    key: str
    seconds: float
    test_accuracy: float
    threads: int
    cached: bool = False


def _source_hash(config: TrainConfig) -> str:
    """Hash of the code that produces the weights plus the config: changes invalidate the cache."""
    digest = hashlib.sha256()
    for module in (sys.modules[__name__], models_module, data_module):
        digest.update(inspect.getsource(module).encode())
    digest.update(inspect.getsource(datasets_module.load_fashion_mnist_tensors).encode())
    statistics = (datasets_module.FASHION_MNIST_MEAN, datasets_module.FASHION_MNIST_STD)
    digest.update(f"{statistics[0]} {statistics[1]}".encode())
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update(torch.__version__.split("+")[0].encode())
    return digest.hexdigest()[:16]


def _fit(model: nn.Module, train: TensorDataset, config: TrainConfig, progress: bool) -> None:
    """The training loop itself (channels-last: depthwise/grouped convs run faster on CPU)."""
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(train, batch_size=config.batch_size, shuffle=True, generator=generator)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                                     weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate,
                                    momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * len(loader))
    train_epochs(model, loader, optimizer, config.epochs, config.name, progress, scheduler)


def train_epochs(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                 epochs: int, name: str, progress: bool, scheduler: Any = None) -> None:
    """Cross-entropy training in channels-last for `epochs`, stepping `scheduler` (if any)
    every batch; leaves the model contiguous and in eval mode."""
    loss_function = nn.CrossEntropyLoss()
    model.to(memory_format=torch.channels_last).train()
    for epoch in range(epochs):
        bar = tqdm(loader, desc=f"{name} epoch {epoch + 1}/{epochs}", unit="batch",
                   leave=False, disable=None if progress else True)
        for images, labels in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_function(model(images.to(memory_format=torch.channels_last)), labels)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.to(memory_format=torch.contiguous_format).eval()


def train_float_with_info(
    name: str,
    epochs: int = DEFAULT_EPOCHS,
    *,
    batch_size: int = 128,
    learning_rate: float = 0.1,
    seed: int = 0,
    data_dir: str | None = None,
    progress: bool = True,
    use_cache: bool = True,
    optimizer: str = "sgd",
    weight_decay: float = 1e-4,
) -> tuple[nn.Module, TrainInfo]:
    """`train_float`, also returning how long training took and the float test accuracy."""
    config = TrainConfig(name, epochs, batch_size, learning_rate, seed=seed, optimizer=optimizer,
                         weight_decay=weight_decay)
    key = _source_hash(config)
    path = CACHE_DIR / f"{name}-{key}.pt"
    if use_cache and path.is_file():
        model = build_model(name)
        stored = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(stored["state_dict"])
        info = TrainInfo(**stored["info"])
        info.cached = True
        return model.eval(), info
    threads = configure_threads()
    torch.manual_seed(seed)
    model = build_model(name)
    start = time.perf_counter()
    _fit(model, load_fashion_mnist("train", data_dir), config, progress)
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, load_fashion_mnist("test", data_dir))
    info = TrainInfo(asdict(config), key, seconds, accuracy, threads)
    if use_cache:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        torch.save({"state_dict": model.state_dict(), "info": asdict(info)}, partial)
        partial.replace(path)  # atomic: a killed run never leaves a half-written cache entry
    return model, info


def train_float(
    name: str,
    epochs: int = DEFAULT_EPOCHS,
    *,
    batch_size: int = 128,
    learning_rate: float = 0.1,
    seed: int = 0,
    data_dir: str | None = None,
    progress: bool = True,
    use_cache: bool = True,
) -> nn.Module:
    """The float model `name` (see `benchmarks.models`) trained on Fashion-MNIST, in eval mode.

    Loaded from the cache when this exact code and config were trained before.
    """
    model, _ = train_float_with_info(name, epochs, batch_size=batch_size,
                                     learning_rate=learning_rate, seed=seed, data_dir=data_dir,
                                     progress=progress, use_cache=use_cache)
    return model


@torch.no_grad()
def predict(model: Any, dataset: TensorDataset, batch_size: int = 500) -> torch.Tensor:
    """Top-1 class of every image of `dataset` under `model` (a module or any callable)."""
    if isinstance(model, nn.Module):
        model.eval()
    images = dataset.tensors[0]
    return torch.cat([model(images[start : start + batch_size]).argmax(1)
                      for start in range(0, len(images), batch_size)])


def evaluate(model: Any, dataset: TensorDataset, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` on `dataset` (a fraction in [0, 1])."""
    return float((predict(model, dataset, batch_size) == dataset.tensors[1]).float().mean())
