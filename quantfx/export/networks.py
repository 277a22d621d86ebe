"""Detectors users bring, as the traceable networks TIDL's meta-architectures read: the layers
up to the head convs, whose outputs are the head tensors; decode and NMS stay outside.

`UltralyticsYolov8Network` takes an ultralytics YOLOv8-family `DetectionModel` (or the `.model`
of `ultralytics.YOLO(...)`) by its structure, without importing ultralytics: a `model`
`nn.Sequential` whose layers carry `f` (where their input comes from) and `i` (their index),
ending in a `Detect` head with per-level box branches `cv2` (4 * reg_max DFL logits) and class
branches `cv3` (logits), `reg_max`, `nc` and `stride`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantfx.errors import ExportError

__all__ = ["UltralyticsYolov8Network", "ultralytics_detect_head"]

HEAD_FIELDS = ("cv2", "cv3", "f", "reg_max", "nc", "stride")


def _layers(model: nn.Module) -> nn.Sequential | None:
    """The layer sequence of a DetectionModel, or of the model inside ultralytics' YOLO."""
    for candidate in (model, getattr(model, "model", None)):
        layers = getattr(candidate, "model", None)
        if isinstance(layers, nn.Sequential) and len(layers) > 1:
            return layers
    return None


def ultralytics_detect_head(model: nn.Module) -> nn.Module:
    """The Detect head of an ultralytics YOLOv8-family detector; an ExportError naming what is
    missing otherwise."""
    layers = _layers(model)
    head = layers[-1] if layers is not None else None
    missing = [name for name in HEAD_FIELDS if not hasattr(head, name)]
    if head is None or missing:
        raise ExportError(f"{type(model).__name__} is not an ultralytics YOLOv8-family detector "
                          f"(expected .model ending in a Detect head with {', '.join(HEAD_FIELDS)}"
                          f"; missing: {', '.join(missing) or 'the layer sequence'}). Pass "
                          "DetectionModel, or YOLO('yolov8n.pt').model.")
    if getattr(head, "end2end", False):
        raise ExportError("this Detect head is end-to-end (one-to-one, NMS-free): TIDL's "
                          "meta-architecture 8 reads the one-to-many DFL head; build the model "
                          "with end2end=False.")
    return head


class UltralyticsYolov8Network(nn.Module):
    """The traceable network of an ultralytics YOLOv8-family detector: its layers routed as
    ultralytics routes them (`f`: the previous layer, or earlier layers by index), then per
    level the Detect head's class branch, then its box branch, raw (what `Yolov8MetaArch`
    describes); the DFL, anchors, decode and NMS stay outside, as TIDL replaces them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        head = ultralytics_detect_head(model)
        layers = _layers(model)
        self.layers = nn.ModuleList(layers[:-1])
        self.sources = [layer.f for layer in self.layers]
        self.head_sources = list(head.f)
        self.class_branches = head.cv3
        self.box_branches = head.cv2

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs: list[Any] = []
        x: Any = images
        for layer, source in zip(self.layers, self.sources):
            if source != -1:
                x = outputs[source] if isinstance(source, int) else [
                    x if index == -1 else outputs[index] for index in source]
            x = layer(x)
            outputs.append(x)
        heads: list[torch.Tensor] = []
        for level, index in enumerate(self.head_sources):
            feature = outputs[index]
            heads += [self.class_branches[level](feature), self.box_branches[level](feature)]
        return tuple(heads)
