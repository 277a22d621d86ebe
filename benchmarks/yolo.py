"""A small YOLOX-style detector in plain PyTorch (backbone, FPN/PAN neck, decoupled per-level
heads whose box / objectness / class convs are concatenated), its decode outside the network,
its loss, and cached training on the canvases of `benchmarks.detection_data`.

The network's outputs are exactly what TIDL's YOLOX meta-architecture reads (one
[N, 4 + 1 + classes, H, W] tensor per stride), so `quantfx.YoloxMetaArch` exports it whole.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
import time
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, generalized_box_iou_loss
from tqdm.auto import tqdm

from benchmarks import detection_data
from benchmarks.detection_data import CANVAS, Canvases
from benchmarks.models import conv_bn
from benchmarks.training import CACHE_DIR

STRIDES = (8, 16)
NUM_CLASSES = 10
LEVEL_SPLIT = 24.0
"""Objects whose longer side is below this many pixels go to stride 8, the rest to 16."""


class Head(nn.Module):
    """YOLOX's decoupled head at one level: a 1x1 stem, a class branch and a box branch; the
    box, objectness and class 1x1 convs are concatenated (what TIDL's yolo_param reads)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, width, 1)
        self.class_branch = conv_bn(width, width)
        self.box_branch = conv_bn(width, width)
        self.box = nn.Conv2d(width, 4, 1)
        self.objectness = nn.Conv2d(width, 1, 1)
        self.classes = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        boxes = self.box_branch(x)
        return torch.cat([self.box(boxes), self.objectness(boxes),
                          self.classes(self.class_branch(x))], 1)


class TinyYolox(nn.Module):
    """Backbone to stride 16, a top-down + bottom-up neck, one head per stride (8, 16)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16, 3, 2)
        self.stage2 = nn.Sequential(conv_bn(16, 32, 3, 2), conv_bn(32, 32))
        self.stage3 = nn.Sequential(conv_bn(32, 48, 3, 2), conv_bn(48, 48))
        self.stage4 = nn.Sequential(conv_bn(48, 64, 3, 2), conv_bn(64, 64))
        self.lateral = conv_bn(64, 48, 1)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down = conv_bn(96, 48)
        self.down = conv_bn(48, 48, 3, 2)
        self.bottom_up = conv_bn(96, 64)
        self.heads = nn.ModuleList([Head(48, num_classes), Head(64, num_classes)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fine = self.stage3(self.stage2(self.stem(x)))
        coarse = self.lateral(self.stage4(fine))
        fine = self.top_down(torch.cat([fine, self.upsample(coarse)], 1))
        coarse = self.bottom_up(torch.cat([self.down(fine), coarse], 1))
        return self.heads[0](fine), self.heads[1](coarse)


def cells() -> tuple[torch.Tensor, torch.Tensor]:
    """(cell x, y [K, 2], stride [K, 1]) of every output position, level by level."""
    grids, strides = [], []
    for stride in STRIDES:
        size = CANVAS // stride
        rows, columns = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        grids.append(torch.stack([columns.flatten(), rows.flatten()], -1).float())
        strides.append(torch.full((size * size, 1), float(stride)))
    return torch.cat(grids), torch.cat(strides)


def decode(outputs: tuple[torch.Tensor, ...], clamp: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes [N, K, 4] x1y1x2y2 pixels, objectness logits [N, K], class logits [N, K, C]),
    the decode TIDL's CODE_TYPE_YOLO_X does."""
    joined = torch.cat([output.flatten(2) for output in outputs], 2).transpose(1, 2)
    grid, stride = cells()
    center = (joined[..., :2] + grid) * stride
    log_size = joined[..., 2:4].clamp(max=6.0) if clamp else joined[..., 2:4]
    size = log_size.exp() * stride
    return torch.cat([center - size / 2, center + size / 2], -1), joined[..., 4], joined[..., 5:]


def detect(outputs: tuple[torch.Tensor, ...], score_threshold: float = 0.01,
           nms_threshold: float = 0.45, keep: int = 100) -> list[dict[str, torch.Tensor]]:
    """Per image: boxes, scores (sigmoid(obj) * sigmoid(class)), labels after per-class NMS."""
    boxes, objectness, logits = decode(outputs)
    scores = objectness.sigmoid()[..., None] * logits.sigmoid()
    return select(boxes, scores, score_threshold, nms_threshold, keep)


def select(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float,
           nms_threshold: float, keep: int) -> list[dict[str, torch.Tensor]]:
    """Per image of boxes [N, K, 4] and scores [N, K, C]: the (box, class) pairs above the
    threshold, per-class NMS, the `keep` highest."""
    results = []
    for image_boxes, image_scores in zip(boxes, scores):
        index, label = torch.nonzero(image_scores > score_threshold, as_tuple=True)
        chosen = image_scores[index, label]
        kept = batched_nms(image_boxes[index], chosen, label, nms_threshold)[:keep]
        results.append({"boxes": image_boxes[index][kept], "scores": chosen[kept],
                        "labels": label[kept]})
    return results


def targets(data: Canvases) -> tuple[torch.Tensor, torch.Tensor]:
    """(class index [N, K] or -1, box [N, K, 4]): each object is assigned to the cells of its
    level (by size) whose centres lie in its box, and always to the cell of its centre;
    a smaller object wins a cell two objects claim."""
    grid, stride = cells()
    centers = (grid + 0.5) * stride
    level_of = torch.cat([torch.full((side * side,), level) for level, side in
                          enumerate(CANVAS // s for s in STRIDES)])
    classes = torch.full((len(data), len(grid)), -1, dtype=torch.int64)
    boxes = torch.zeros(len(data), len(grid), 4)
    for image, (image_boxes, labels) in enumerate(zip(data.boxes, data.labels)):
        areas = (image_boxes[:, 2:] - image_boxes[:, :2]).prod(1)
        for item in areas.argsort(descending=True).tolist():  # smaller ones overwrite
            box = image_boxes[item]
            level = int(float((box[2:] - box[:2]).max()) >= LEVEL_SPLIT)
            inside = ((centers >= box[:2]) & (centers < box[2:])).all(1) & (level_of == level)
            middle = (box[:2] + box[2:]) / 2
            distance = ((centers - middle).abs() / stride).amax(1)
            inside |= (distance <= 0.5) & (level_of == level)
            classes[image, inside] = labels[item]
            boxes[image, inside] = box
    return classes, boxes


def loss(outputs: tuple[torch.Tensor, ...], classes: torch.Tensor, boxes: torch.Tensor
         ) -> torch.Tensor:
    """YOLOX's three terms: objectness BCE on every cell, class BCE and GIoU on positives."""
    predicted, objectness, logits = decode(outputs, clamp=True)
    positive = classes >= 0
    count = max(1, int(positive.sum()))
    objectness_loss = F.binary_cross_entropy_with_logits(objectness, positive.float(),
                                                         reduction="sum")
    one_hot = F.one_hot(classes[positive], logits.shape[-1]).float()
    class_loss = F.binary_cross_entropy_with_logits(logits[positive], one_hot, reduction="sum")
    box_loss = generalized_box_iou_loss(predicted[positive], boxes[positive], reduction="sum")
    return (objectness_loss + class_loss + 5.0 * box_loss) / count


def fit(model: nn.Module, data: Canvases, epochs: int, learning_rate: float,
        progress: bool = True, seed: int = 0, batch_size: int = 64,
        loss_fn: Callable[..., torch.Tensor] = loss) -> None:
    """SGD (momentum 0.9, weight decay 1e-4 on every parameter: TI's recipe), a short linear
    warm-up, then cosine; works on a float or a `prepare_qat` model. `loss_fn(outputs,
    classes, boxes)` scores the model's outputs against `targets(data)`."""
    classes, boxes = targets(data)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9,
                                weight_decay=1e-4)
    steps = epochs * ((len(data) + batch_size - 1) // batch_size)
    warmup = min(200, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / max(1, warmup), 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)))))
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        bar = tqdm(range(0, len(data), batch_size), desc=f"detector epoch {epoch + 1}/{epochs}",
                   unit="batch", leave=False, disable=None if progress else True)
        for start in bar:
            chosen = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            value = loss_fn(model(data.images[chosen]), classes[chosen], boxes[chosen])
            value.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{value.item():.3f}", refresh=False)
    model.eval()


def predict(model: nn.Module, data: Canvases, batch_size: int = 250,
            detect_fn: Callable[..., list[dict[str, torch.Tensor]]] = detect
            ) -> list[dict[str, torch.Tensor]]:
    detections = []
    with torch.no_grad():
        for start, end in data.batches(batch_size):
            detections += detect_fn(model(data.images[start:end]))
    return detections


TRAIN_IMAGES, TEST_IMAGES, EPOCHS, LEARNING_RATE = 12000, 1000, 12, 0.05


def trained_detector(progress: bool = True) -> tuple[nn.Module, float, bool]:
    """(the trained float detector, training seconds, whether it came from the cache): the
    weights are cached under CACHE_DIR, keyed by this code and the data code."""
    return cached_detector("tiny_yolox", TinyYolox, [sys.modules[__name__]], loss, progress)


def cached_detector(name: str, build: Callable[[], nn.Module], sources: list[ModuleType],
                    loss_fn: Callable[..., torch.Tensor], progress: bool
                    ) -> tuple[nn.Module, float, bool]:
    """`build()` trained with `loss_fn` (EPOCHS on the training canvases), cached under
    CACHE_DIR keyed by the `sources`' code, this module's and the data code."""
    digest = hashlib.sha256()
    for module in (*sources, sys.modules[__name__], detection_data):
        digest.update(inspect.getsource(module).encode())
    digest.update(torch.__version__.split("+")[0].encode())
    path = CACHE_DIR / f"{name}-{digest.hexdigest()[:16]}.pt"
    torch.manual_seed(0)
    model = build()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), 0.0, True
    start = time.perf_counter()
    fit(model, make_training_set(), EPOCHS, LEARNING_RATE, progress, loss_fn=loss_fn)
    seconds = time.perf_counter() - start
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(model.state_dict(), temporary)
    temporary.replace(path)
    return model, seconds, False


def make_training_set() -> Canvases:
    return detection_data.make_canvases("train", TRAIN_IMAGES, seed=0)


def make_test_set() -> Canvases:
    return detection_data.make_canvases("test", TEST_IMAGES, seed=1)
