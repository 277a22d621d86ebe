"""Small models and utilities shared by the tests."""

import socket

import torch
from torch import nn

import quantfx as qf


class ConvBnReLU(nn.Module):
    """conv → bn → relu → conv → flatten → linear: the smallest realistic CNN."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 4)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics, so folding is really tested."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(shape, generator=generator) * 0.1)
    return model


def quantize_model(model: nn.Module, shape=(2, 3, 16, 16), batches: int = 3, config=None, seed=0):
    """prepare → calibrate on random data → convert; returns (prepared, converted)."""
    generator = torch.Generator().manual_seed(seed)
    data = [torch.randn(shape, generator=generator) for _ in range(batches)]
    prepared = qf.prepare(model, (data[0],), config)
    qf.calibrate(prepared, data)
    return prepared, qf.convert(prepared)


def quantizer_modules(model: nn.Module) -> dict:
    """name → activation quantizer of a prepared or converted model."""
    return {
        name: module for name, module in model.named_modules() if name.startswith("quantizers.")
    }


class TinyDecoder(nn.Module):
    """An encoder-decoder with transposed convolutions, as segmentation heads upsample: an
    ungrouped deconv + BN (foldable) and a grouped one with output_padding (not foldable)."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                                    nn.ReLU())
        self.up1 = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.up2 = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.relu(self.bn1(self.up1(self.encode(x))))
        return self.head(self.up2(x))


def free_port() -> int:
    """A free TCP port on localhost, for a torch.distributed process group in a test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
