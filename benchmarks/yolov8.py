"""A small YOLOv8-style detector in plain PyTorch, written here (no ultralytics code): a
backbone of C2f blocks, a PAN neck, and per level a decoupled head whose class conv gives
logits and whose box conv gives DFL logits (`REG_MAX` bins for each of the left, top, right and
bottom distances); its decode outside the network, its loss, and cached training on the
canvases of `benchmarks.detection_data` (the YOLOX-style net's data, assignment and recipe).

The network's outputs are what TIDL's YOLOv8 meta-architecture (meta_arch_type 8, caffe_ssd
with CODE_TYPE_DIST2BBOX) reads: per stride the class conv, then the box conv, so
`quantfx.Yolov8MetaArch` exports it whole.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from benchmarks import yolo
from benchmarks.detection_data import Canvases
from benchmarks.models import conv_bn

STRIDES = yolo.STRIDES
NUM_CLASSES = yolo.NUM_CLASSES
REG_MAX = 16
"""Bins per box side, YOLOv8's default (distances 0 .. 15 cells)."""
DFL_WEIGHT = 1.0


class C2f(nn.Module):
    """YOLOv8's C2f: a 1x1 conv, its output split in two, a chain of residual 3x3 pairs on
    the second half, every intermediate concatenated, a 1x1 conv back to `channels`."""

    def __init__(self, in_channels: int, channels: int, blocks: int = 1) -> None:
        super().__init__()
        self.half = channels // 2
        self.expand = conv_bn(in_channels, 2 * self.half, 1)
        self.blocks = nn.ModuleList(nn.Sequential(conv_bn(self.half, self.half),
                                                  conv_bn(self.half, self.half))
                                    for _ in range(blocks))
        self.merge = conv_bn((2 + blocks) * self.half, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.expand(x).chunk(2, 1))
        for block in self.blocks:
            parts.append(parts[-1] + block(parts[-1]))
        return self.merge(torch.cat(parts, 1))


class Head(nn.Module):
    """One level's decoupled head: two 3x3 convs then a 1x1 conv for the class logits, the
    same for the 4 * REG_MAX box-distribution logits."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.class_branch = nn.Sequential(conv_bn(in_channels, width), conv_bn(width, width),
                                          nn.Conv2d(width, num_classes, 1))
        self.box_branch = nn.Sequential(conv_bn(in_channels, width), conv_bn(width, width),
                                        nn.Conv2d(width, 4 * REG_MAX, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.class_branch(x), self.box_branch(x)


class TinyYolov8(nn.Module):
    """Backbone of strided convs + C2f to stride 16, a top-down + bottom-up PAN neck of C2f
    blocks, one decoupled head per stride (8, 16)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16, 3, 2)
        self.stage2 = nn.Sequential(conv_bn(16, 32, 3, 2), C2f(32, 32))
        self.stage3 = nn.Sequential(conv_bn(32, 48, 3, 2), C2f(48, 48))
        self.stage4 = nn.Sequential(conv_bn(48, 64, 3, 2), C2f(64, 64))
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down = C2f(48 + 64, 48)
        self.down = conv_bn(48, 48, 3, 2)
        self.bottom_up = C2f(48 + 64, 64)
        self.heads = nn.ModuleList([Head(48, num_classes), Head(64, num_classes)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fine = self.stage3(self.stage2(self.stem(x)))
        coarse = self.stage4(fine)
        fine = self.top_down(torch.cat([fine, self.upsample(coarse)], 1))
        coarse = self.bottom_up(torch.cat([self.down(fine), coarse], 1))
        return (*self.heads[0](fine), *self.heads[1](coarse))


def _joined(outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(class logits [N, K, C], box-distribution logits [N, K, 4, REG_MAX]) over all cells."""
    logits = torch.cat([output.flatten(2) for output in outputs[0::2]], 2).transpose(1, 2)
    boxes = torch.cat([output.flatten(2) for output in outputs[1::2]], 2).transpose(1, 2)
    return logits, boxes.unflatten(2, (4, REG_MAX))


def decode(outputs: tuple[torch.Tensor, ...]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes [N, K, 4] x1y1x2y2 pixels, class logits [N, K, C], DFL logits [N, K, 4, R]): the
    expectation of each side's bins (in cells) times the stride, from the cell centre; the
    decode TIDL's CODE_TYPE_DIST2BBOX does."""
    logits, distribution = _joined(outputs)
    grid, stride = yolo.cells()
    bins = torch.arange(REG_MAX, dtype=distribution.dtype)
    distances = (distribution.softmax(-1) * bins).sum(-1) * stride
    center = (grid + 0.5) * stride
    return torch.cat([center - distances[..., :2], center + distances[..., 2:]], -1), logits, \
        distribution


def detect(outputs: tuple[torch.Tensor, ...], score_threshold: float = 0.01,
           nms_threshold: float = 0.45, keep: int = 100) -> list[dict[str, torch.Tensor]]:
    """Per image: boxes, scores (sigmoid(class)), labels after per-class NMS."""
    boxes, logits, _ = decode(outputs)
    return yolo.select(boxes, logits.sigmoid(), score_threshold, nms_threshold, keep)


def _dfl(distribution: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution focal loss: cross-entropy to the two bins around each target distance,
    weighted by closeness (GFL's DFL); distribution [P, 4, R], target [P, 4] in cells."""
    target = target.clamp(0, REG_MAX - 1.01)
    left = target.floor().long()
    weight_right = target - left
    log_probabilities = distribution.log_softmax(-1)
    return -(log_probabilities.gather(-1, left[..., None])[..., 0] * (1 - weight_right)
             + log_probabilities.gather(-1, left[..., None] + 1)[..., 0] * weight_right).sum()


def loss(outputs: tuple[torch.Tensor, ...], classes: torch.Tensor, boxes: torch.Tensor
         ) -> torch.Tensor:
    """Class BCE on every cell (one-hot on the assigned cells), GIoU and DFL on positives."""
    predicted, logits, distribution = decode(outputs)
    positive = classes >= 0
    count = max(1, int(positive.sum()))
    target = torch.zeros_like(logits)
    target[positive] = F.one_hot(classes[positive], logits.shape[-1]).to(logits.dtype)
    class_loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    box_loss = generalized_box_iou_loss(predicted[positive], boxes[positive], reduction="sum")
    grid, stride = yolo.cells()
    center = ((grid + 0.5) * stride).expand_as(predicted[..., :2])[positive]
    cell = stride.expand(*positive.shape, 1)[positive]
    sides = torch.cat([center - boxes[positive][:, :2], boxes[positive][:, 2:] - center], -1)
    dfl_loss = _dfl(distribution[positive], sides / cell)
    return (class_loss + 5.0 * box_loss + DFL_WEIGHT * dfl_loss) / count


def predict(model: nn.Module, data: Canvases, batch_size: int = 250
            ) -> list[dict[str, torch.Tensor]]:
    return yolo.predict(model, data, batch_size, detect_fn=detect)


def fit(model: nn.Module, data: Canvases, epochs: int, learning_rate: float,
        progress: bool = True) -> None:
    yolo.fit(model, data, epochs, learning_rate, progress, loss_fn=loss)


def trained_detector(progress: bool = True) -> tuple[nn.Module, float, bool]:
    """(the trained float detector, training seconds, whether it came from the cache)."""
    return yolo.cached_detector("tiny_yolov8", TinyYolov8, [sys.modules[__name__]], loss,
                                progress)
