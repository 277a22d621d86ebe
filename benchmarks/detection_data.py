"""Detection data with known boxes: Fashion-MNIST items pasted at random sizes and places
into blank canvases, and mAP@0.5 (VOC all-point) to score detections on them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from quantfx.demo.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist_tensors

CANVAS = 64
"""Canvas side in pixels (a YOLO-style net at strides 8 and 16 sees 8x8 and 4x4 cells)."""
SCALES = (0.6, 1.3)
"""Range of the item's scale against its 28x28 tile."""
MAX_OBJECTS = 3


@dataclass
class Canvases:
    """N x 1 x CANVAS x CANVAS normalized images and, per image, boxes (x1, y1, x2, y2 in
    pixels, float) and labels (int64)."""

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, size: int) -> list[tuple[int, int]]:
        return [(start, min(start + size, len(self))) for start in range(0, len(self), size)]


def make_canvases(split: str, count: int, seed: int,
                  data_dir: str | os.PathLike | None = None) -> Canvases:
    """`count` canvases of 1 to MAX_OBJECTS items from `split`, each box the tight box of the
    item's pixels; items overlap by IoU 0.2 at most. Deterministic for a seed."""
    tiles, tile_labels = load_fashion_mnist_tensors(split, data_dir)
    tiles = tiles * FASHION_MNIST_STD + FASHION_MNIST_MEAN  # back to [0, 1] pixels
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 1, CANVAS, CANVAS)
    boxes, labels = [], []
    for index in range(count):
        wanted = int(torch.randint(1, MAX_OBJECTS + 1, (1,), generator=generator))
        placed: list[list[float]] = []
        classes: list[int] = []
        for _ in range(wanted * 4):  # a few tries per item, then fewer items
            if len(placed) == wanted:
                break
            source = int(torch.randint(len(tiles), (1,), generator=generator))
            low, high = SCALES
            scale = low + (high - low) * float(torch.rand(1, generator=generator))
            side = max(8, round(28 * scale))
            tile = F.interpolate(tiles[source][None], size=(side, side), mode="bilinear",
                                 align_corners=False)[0, 0].clamp(0, 1)
            rows = torch.nonzero(tile.amax(1) > 0.1).flatten()
            columns = torch.nonzero(tile.amax(0) > 0.1).flatten()
            if len(rows) == 0 or len(columns) == 0:
                continue
            top = int(torch.randint(CANVAS - side + 1, (1,), generator=generator))
            left = int(torch.randint(CANVAS - side + 1, (1,), generator=generator))
            box = [left + int(columns[0]), top + int(rows[0]), left + int(columns[-1]) + 1,
                   top + int(rows[-1]) + 1]
            if placed and float(box_iou(torch.tensor([box], dtype=torch.float),
                                        torch.tensor(placed)).max()) > 0.2:
                continue
            region = images[index, 0, top:top + side, left:left + side]
            torch.maximum(region, tile, out=region)
            placed.append([float(value) for value in box])
            classes.append(int(tile_labels[source]))
        boxes.append(torch.tensor(placed).reshape(-1, 4))
        labels.append(torch.tensor(classes, dtype=torch.int64))
    images = (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return Canvases(images, boxes, labels)


def average_precision(recall: torch.Tensor, precision: torch.Tensor) -> float:
    """Area under the precision envelope (VOC 2010+ all-point interpolation)."""
    recall = torch.cat([torch.tensor([0.0]), recall, torch.tensor([1.0])])
    precision = torch.cat([torch.tensor([0.0]), precision, torch.tensor([0.0])])
    precision = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
    changes = torch.nonzero(recall[1:] != recall[:-1]).flatten()
    return float(((recall[changes + 1] - recall[changes]) * precision[changes + 1]).sum())


def mean_average_precision(detections: list[dict[str, torch.Tensor]], data: Canvases,
                           num_classes: int, iou_threshold: float = 0.5) -> float:
    """mAP@`iou_threshold` in percent over the classes that have ground truth: each
    detection (highest score first) matches the best unmatched box of its class and image."""
    averages = []
    for label in range(num_classes):
        truths = [boxes[labels == label] for boxes, labels in zip(data.boxes, data.labels)]
        total = sum(len(boxes) for boxes in truths)
        if total == 0:
            continue
        found = [(float(score), image, box) for image, found in enumerate(detections)
                 for score, box in zip(found["scores"][found["labels"] == label],
                                       found["boxes"][found["labels"] == label])]
        found.sort(key=lambda item: -item[0])
        used = [torch.zeros(len(boxes), dtype=torch.bool) for boxes in truths]
        hits = torch.zeros(len(found))
        for rank, (_, image, box) in enumerate(found):
            if len(truths[image]) == 0:
                continue
            overlap = box_iou(box[None], truths[image])[0]
            overlap[used[image]] = -1.0
            best = int(overlap.argmax())
            if float(overlap[best]) >= iou_threshold:
                used[image][best] = True
                hits[rank] = 1.0
        true_positives = torch.cumsum(hits, 0)
        recall = true_positives / total
        precision = true_positives / torch.arange(1, len(found) + 1)
        averages.append(average_precision(recall, precision))
    return 100.0 * sum(averages) / max(1, len(averages))
