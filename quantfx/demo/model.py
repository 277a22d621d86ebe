"""The demo's model and training: a small conv-BN-ReLU CNN trained with TI's recipe."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm


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


def train_epochs(model: nn.Module, data: TensorDataset, epochs: int, learning_rate: float,
                 batch_size: int, seed: int, progress: bool = False) -> nn.Module:
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
