"""TIDL's detection meta-architectures: what `export_onnx(..., detection=...)` needs to know
about a detector's head tensors, and the prototxt TIDL reads to replace decode and NMS with
its own detection layer.

Three kinds (the fields follow TI's `tidl_meta_arch` proto, ../shared/TIDL_FACTS.md §4):
`YoloxMetaArch` (meta_arch_type 6, `tidl_yolo`, code type YOLO_X: per level one head tensor
[1, 4 + 1 + classes, H, W] of box, objectness and class logits, anchor = stride),
`Yolov8MetaArch` (meta_arch_type 8, `caffe_ssd`, code type DIST2BBOX, sigmoid scores: per level
a class conv [1, classes, H, W] then a box conv [1, 4 * reg_max, H, W] of DFL logits) and
`SsdMetaArch` (meta_arch_type 3, `caffe_ssd`, code type CENTER_SIZE: per level a box conv
[1, anchors * 4, H, W] and a class conv [1, anchors * classes, H, W], caffe PriorBox anchors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantfx.checks import as_tuple, check_bool, check_int, check_number
from quantfx.errors import ConfigError, ExportError, warn
from quantfx.export.networks import ultralytics_detect_head

__all__ = ["PriorBoxes", "SsdMetaArch", "TorchvisionSsdNetwork", "Yolov8MetaArch", "YoloxMetaArch",
           "check_heads", "prototxt"]


def _check_strides(arch: Any) -> None:
    name = type(arch).__name__
    strides = as_tuple(arch.strides, f"{name}.strides",
                       lambda item: isinstance(item, int) and not isinstance(item, bool)
                       and item > 0, "positive integers such as (8, 16, 32)", ConfigError)
    if not strides:
        raise ConfigError(f"{name}.strides is empty; give one stride per level, e.g. "
                          "strides=(8, 16, 32).")
    object.__setattr__(arch, "strides", strides)


def _check_thresholds(arch: Any) -> None:
    check_int(arch.num_classes, "num_classes", 1, ConfigError, "10")
    check_number(arch.confidence_threshold, "confidence_threshold", 0.0, 1.0, error=ConfigError,
                 example="0.3")
    check_number(arch.nms_threshold, "nms_threshold", 0.0, 1.0, low_open=True,
                 error=ConfigError, example="0.45")
    check_int(arch.top_k, "top_k", 1, ConfigError, "200")
    check_int(arch.keep_top_k, "keep_top_k", 1, ConfigError, "200")


@dataclass(frozen=True)
class YoloxMetaArch:
    """An anchor-free YOLOX-style detector: the model's outputs are its head tensors, one per
    stride, each [1, 4 + 1 + num_classes, H, W] = (x, y, log w, log h) box offsets in cells,
    objectness logit, class logits; TIDL decodes center = (xy + cell) * stride,
    size = exp(wh) * stride, score = sigmoid(obj) * sigmoid(class)."""

    strides: Sequence[int]
    num_classes: int
    confidence_threshold: float = 0.3
    nms_threshold: float = 0.45
    top_k: int = 200
    """Boxes per class kept by NMS."""
    keep_top_k: int = 200
    """Detections kept in all (highest scores)."""

    META_ARCH_TYPE = 6
    CODE_TYPE = "CODE_TYPE_YOLO_X"

    def __post_init__(self) -> None:
        _check_strides(self)
        _check_thresholds(self)

    @property
    def head_count(self) -> int:
        return len(self.strides)


@dataclass(frozen=True)
class Yolov8MetaArch:
    """An anchor-free YOLOv8-style detector (decoupled head, DFL box regression, no
    objectness): the model's outputs are, per stride, the class conv [1, num_classes, H, W]
    (logits) then the box conv [1, 4 * reg_max, H, W] (for each of the left, top, right, bottom
    distances, reg_max logits over 0 .. reg_max - 1 cells). TIDL decodes distance =
    sum(softmax(logits) * bin) * stride from the cell centre (i + 0.5) * stride,
    score = sigmoid(class). With reg_max 1 (no distribution) the box conv gives the four
    distances, in cells, itself."""

    strides: Sequence[int]
    num_classes: int
    reg_max: int = 16
    """Bins per box side (YOLOv8's default 16)."""
    confidence_threshold: float = 0.3
    nms_threshold: float = 0.45
    top_k: int = 200
    """Boxes per class kept by NMS."""
    keep_top_k: int = 200
    """Detections kept in all (highest scores)."""

    META_ARCH_TYPE = 8
    CODE_TYPE = "CODE_TYPE_DIST2BBOX"

    def __post_init__(self) -> None:
        _check_strides(self)
        _check_thresholds(self)
        check_int(self.reg_max, "reg_max", 1, ConfigError, "16")

    @property
    def head_count(self) -> int:
        return 2 * len(self.strides)

    @classmethod
    def from_ultralytics(cls, model: nn.Module, **thresholds: Any) -> Yolov8MetaArch:
        """The meta-architecture of an ultralytics YOLOv8-family detector (its Detect head's
        strides, classes and reg_max), for the network of `UltralyticsYolov8Network`."""
        head = ultralytics_detect_head(model)
        strides = tuple(int(stride) for stride in torch.as_tensor(head.stride).tolist())
        return cls(strides=strides, num_classes=int(head.nc), reg_max=int(head.reg_max),
                   **thresholds)


@dataclass(frozen=True)
class PriorBoxes:
    """One level's anchors as caffe's PriorBox makes them (pixels at the network input):
    a min_size square, a sqrt(min_size * max_size) square, then for each aspect ratio r a
    min_size * sqrt(r) by min_size / sqrt(r) box and (with `flip`) its transpose, centred at
    (i + offset) * step."""

    min_size: float
    max_size: float | None
    aspect_ratios: Sequence[float]
    step: float
    offset: float = 0.5
    flip: bool = True

    def __post_init__(self) -> None:
        check_number(self.min_size, "PriorBoxes.min_size", 0.0, low_open=True, error=ConfigError)
        if self.max_size is not None:
            check_number(self.max_size, "PriorBoxes.max_size", self.min_size, error=ConfigError)
        check_number(self.step, "PriorBoxes.step", 0.0, low_open=True, error=ConfigError)
        check_number(self.offset, "PriorBoxes.offset", 0.0, 1.0, error=ConfigError)
        check_bool(self.flip, "PriorBoxes.flip", ConfigError)
        ratios = as_tuple(self.aspect_ratios, "PriorBoxes.aspect_ratios",
                          lambda item: isinstance(item, (int, float)) and not isinstance(
                              item, bool) and item > 0, "positive numbers such as (2.0, 3.0)",
                          ConfigError)
        object.__setattr__(self, "aspect_ratios", tuple(float(item) for item in ratios))

    @property
    def boxes_per_cell(self) -> int:
        return 1 + (self.max_size is not None) + len(self.aspect_ratios) * (1 + self.flip)

    def sizes(self) -> list[tuple[float, float]]:
        """(width, height) of each anchor of a cell, in caffe's order."""
        sizes = [(self.min_size, self.min_size)]
        if self.max_size is not None:
            side = math.sqrt(self.min_size * self.max_size)
            sizes.append((side, side))
        for ratio in self.aspect_ratios:
            root = math.sqrt(ratio)
            sizes.append((self.min_size * root, self.min_size / root))
            if self.flip:
                sizes.append((self.min_size / root, self.min_size * root))
        return sizes

    def anchors(self, height: int, width: int) -> torch.Tensor:
        """[height * width * boxes_per_cell, 4] (cx, cy, w, h) in pixels, row-major cells."""
        rows = (torch.arange(height, dtype=torch.float64) + self.offset) * self.step
        columns = (torch.arange(width, dtype=torch.float64) + self.offset) * self.step
        cy, cx = torch.meshgrid(rows, columns, indexing="ij")
        sizes = torch.tensor(self.sizes(), dtype=torch.float64)
        centers = torch.stack([cx, cy], -1).reshape(-1, 1, 2).expand(-1, len(sizes), 2)
        return torch.cat([centers, sizes.expand(centers.shape[0], -1, -1)], -1).reshape(-1, 4)


@dataclass(frozen=True)
class SsdMetaArch:
    """A caffe-style SSD: the model's outputs are one box conv per level, then one class conv
    per level, in the order of `priors`; scores are a softmax over `num_classes` (background
    included, at `background_label_id`), boxes decode CENTER_SIZE with `variance`."""

    priors: Sequence[PriorBoxes]
    num_classes: int
    background_label_id: int = 0
    variance: Sequence[float] = (0.1, 0.1, 0.2, 0.2)
    confidence_threshold: float = 0.3
    nms_threshold: float = 0.45
    top_k: int = 200
    keep_top_k: int = 200
    notes: tuple[str, ...] = field(default=(), compare=False)
    """What differs between the source model and this description (written to the report)."""

    META_ARCH_TYPE = 3
    CODE_TYPE = "CENTER_SIZE"

    def __post_init__(self) -> None:
        priors = as_tuple(self.priors, "SsdMetaArch.priors",
                          lambda item: isinstance(item, PriorBoxes),
                          "quantfx.PriorBoxes, one per level", ConfigError)
        if not priors:
            raise ConfigError("SsdMetaArch.priors is empty; give one PriorBoxes per level.")
        object.__setattr__(self, "priors", priors)
        _check_thresholds(self)
        check_int(self.background_label_id, "background_label_id", -1, ConfigError, "0")
        if self.background_label_id >= self.num_classes:
            raise ConfigError(f"background_label_id={self.background_label_id} is not a class "
                              f"of num_classes={self.num_classes}; use -1 for none.")
        variance = as_tuple(self.variance, "SsdMetaArch.variance",
                            lambda item: isinstance(item, (int, float)) and not isinstance(
                                item, bool) and item > 0,
                            "four positive numbers, e.g. (0.1, 0.1, 0.2, 0.2)", ConfigError)
        if len(variance) != 4:
            raise ConfigError(f"SsdMetaArch.variance needs 4 numbers, got {len(variance)}.")
        object.__setattr__(self, "variance", tuple(float(item) for item in variance))

    @property
    def head_count(self) -> int:
        return 2 * len(self.priors)

    @classmethod
    def from_torchvision(cls, detector: nn.Module, **thresholds: Any) -> SsdMetaArch:
        """The meta-architecture of a torchvision SSD / SSDlite (its DefaultBoxGenerator,
        box coder weights and class count), for the network of `TorchvisionSsdNetwork`."""
        generator = getattr(detector, "anchor_generator", None)
        size = getattr(getattr(detector, "transform", None), "fixed_size", None)
        if generator is None or not hasattr(generator, "scales") or size is None:
            raise ExportError(f"{type(detector).__name__} is not a torchvision SSD (no "
                              "DefaultBoxGenerator / fixed transform size).")
        height, width = size
        if height != width:
            raise ExportError(f"caffe PriorBox anchors are square in pixels; this SSD runs at "
                              f"{width}x{height}. Use a square input size.")
        scales, steps = generator.scales, generator.steps
        if steps is None:  # centres at (i + 0.5) / feature size: the step is image / feature
            steps = [width / size for size in _feature_sizes(detector, height)]
        priors = [PriorBoxes(min_size=scales[level] * width, max_size=scales[level + 1] * width,
                             aspect_ratios=tuple(ratios), step=float(steps[level]))
                  for level, ratios in enumerate(generator.aspect_ratios)]
        clamped = 0
        if generator.clip:
            clamped = sum(1 for prior in priors for w, h in prior.sizes() if max(w, h) > width)
        weights = detector.box_coder.weights
        notes = ()
        if clamped:
            notes = (f"{clamped} anchor shapes are wider than the image: torchvision clamps "
                     "them to the image size, caffe's PriorBox (TIDL) does not.",)
            warn("quantfx: " + notes[0])
        return cls(priors=priors, num_classes=detector.head.classification_head.num_columns,
                   background_label_id=0, variance=tuple(1.0 / w for w in weights),
                   notes=notes, **thresholds)


def _feature_sizes(detector: nn.Module, size: int) -> list[int]:
    """The width of each feature map the SSD's backbone gives at `size` x `size`."""
    with torch.no_grad():
        parameter = next(detector.parameters())
        probe = torch.zeros(1, 3, size, size, dtype=parameter.dtype, device=parameter.device)
        was_training = detector.training
        detector.eval()
        try:
            return [int(feature.shape[-1]) for feature in detector.backbone(probe).values()]
        finally:
            detector.train(was_training)


class TorchvisionSsdNetwork(nn.Module):
    """The traceable network of a torchvision SSD / SSDlite: a normalized, resized image in,
    each level's box conv then each level's class conv out (what TIDL's caffe_ssd reads); the
    transform, anchors, decode and NMS stay outside, as TIDL replaces them."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        head = getattr(detector, "head", None)
        if not hasattr(getattr(head, "regression_head", None), "module_list") or not hasattr(
                detector, "backbone"):
            raise ExportError(f"{type(detector).__name__} is not a torchvision SSD / SSDlite "
                              "(no backbone and per-level head convs); quantize other detectors "
                              "in parts (QuantConfig(quantize_only='auto')).")
        self.backbone = detector.backbone
        self.box_convs = head.regression_head.module_list
        self.class_convs = head.classification_head.module_list

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = list(self.backbone(images).values())
        boxes = [conv(feature) for conv, feature in zip(self.box_convs, features)]
        classes = [conv(feature) for conv, feature in zip(self.class_convs, features)]
        return tuple(boxes + classes)


def _number(value: float) -> str:
    """A float as the prototxt writes it: six significant digits, always with a point."""
    return repr(float(f"{float(value):.6g}"))


MetaArch = YoloxMetaArch | Yolov8MetaArch | SsdMetaArch
"""Any detection meta-architecture `export_onnx(..., detection=...)` takes."""


def _yolox_block(arch: YoloxMetaArch, heads: list[str]) -> list[str]:
    lines = []
    for head, stride in zip(heads, arch.strides):
        lines += ["  yolo_param {", f'    input: "{head}"', f"    anchor_width: {_number(stride)}",
                  f"    anchor_height: {_number(stride)}", "  }"]
    return lines


def _yolov8_block(heads: list[str]) -> list[str]:
    """Per level the class conv then the box conv (the order TI's YOLOv8 exporter lists)."""
    return [f'  box_input: "{head}"' for head in heads[1::2]] + [
        f'  class_input: "{head}"' for head in heads[0::2]] + ["  score_converter: SIGMOID"]


def _ssd_block(arch: SsdMetaArch, heads: list[str]) -> list[str]:
    levels = len(arch.priors)
    lines = [f'  box_input: "{head}"' for head in heads[:levels]]
    lines += [f'  class_input: "{head}"' for head in heads[levels:]]
    for prior in arch.priors:
        lines += ["  prior_box_param {", f"    min_size: {_number(prior.min_size)}"]
        if prior.max_size is not None:
            lines.append(f"    max_size: {_number(prior.max_size)}")
        lines += [f"    aspect_ratio: {_number(ratio)}" for ratio in prior.aspect_ratios]
        lines += [f"    flip: {str(prior.flip).lower()}", "    clip: false"]
        lines += [f"    variance: {_number(value)}" for value in arch.variance]
        lines += [f"    step: {_number(prior.step)}", f"    offset: {_number(prior.offset)}",
                  "  }"]
    return lines + ["  data_layout: INTERLEAVED"]


def prototxt(arch: MetaArch, heads: list[str], outputs: list[str], in_height: int,
             in_width: int) -> str:
    """The meta-architecture file's text (protobuf text format, TI's field names)."""
    post = [f"num_classes: {arch.num_classes}", "share_location: true",
            f"background_label_id: {getattr(arch, 'background_label_id', -1)}",
            "nms_param {", f"  nms_threshold: {_number(arch.nms_threshold)}",
            f"  top_k: {arch.top_k}", "}",
            f"code_type: {arch.CODE_TYPE}", f"keep_top_k: {arch.keep_top_k}",
            f"confidence_threshold: {_number(arch.confidence_threshold)}"]
    if isinstance(arch, YoloxMetaArch):
        name, block, lines = "yolox", "tidl_yolo", _yolox_block(arch, heads)
    elif isinstance(arch, Yolov8MetaArch):
        name, block, lines = "yolov8", "caffe_ssd", _yolov8_block(heads)
    else:
        name, block, lines = "ssd", "caffe_ssd", _ssd_block(arch, heads)
    lines += ["  detection_output_param {"] + [f"    {item}" for item in post] + ["  }"]
    lines += [f'  name: "{name}"', f"  in_width: {in_width}", f"  in_height: {in_height}"]
    lines += [f'  output: "{output}"' for output in outputs]
    lines.append('  framework: "quantfx"')
    return f'name: "{name}"\n{block} {{\n' + "\n".join(lines) + "\n}\n"


def _expected_heads(arch: MetaArch, in_height: int, in_width: int
                    ) -> list[tuple[int, int | None, int | None]]:
    """(channels, height, width) of each head output; None where any size will do."""
    if isinstance(arch, YoloxMetaArch):
        return [(4 + 1 + arch.num_classes, in_height // stride, in_width // stride)
                for stride in arch.strides]
    if isinstance(arch, Yolov8MetaArch):
        return [(channels, in_height // stride, in_width // stride) for stride in arch.strides
                for channels in (arch.num_classes, 4 * arch.reg_max)]
    cells = [prior.boxes_per_cell for prior in arch.priors]
    return [(count * 4, None, None) for count in cells] + [
        (count * arch.num_classes, None, None) for count in cells]


ORDER = {YoloxMetaArch: "one per stride", Yolov8MetaArch: "per stride the class conv, then the "
         "box conv", SsdMetaArch: "the box convs of every level, then the class convs"}


def check_heads(arch: MetaArch, shapes: list[tuple[str, list[int]]], in_height: int,
                in_width: int) -> None:
    """An ExportError unless the model's outputs are the head tensors `arch` describes."""
    if len(shapes) != arch.head_count:
        raise ExportError(f"detection={type(arch).__name__} expects {arch.head_count} model "
                          f"outputs ({ORDER[type(arch)]}); the model has {len(shapes)}.")
    for index, (name, shape) in enumerate(shapes):
        if len(shape) != 4 or shape[0] != 1:
            raise ExportError(f"detection export needs each head output as [1, C, H, W] (batch "
                              f"1, as TIDL runs it); output {index} ({name}) is {shape}.")
    expected = _expected_heads(arch, in_height, in_width)
    for index, ((name, shape), (channels, height, width)) in enumerate(zip(shapes, expected)):
        if shape[1] != channels or (height is not None and tuple(shape[2:]) != (height, width)):
            grid = ", H, W" if height is None else f", {height}, {width}"
            raise ExportError(f"head output {index} ({name}) has shape {shape}; "
                              f"{type(arch).__name__} expects [1, {channels}{grid}] for it "
                              f"({ORDER[type(arch)]}). Check num_classes, strides / priors"
                              f"{', reg_max' if isinstance(arch, Yolov8MetaArch) else ''} and "
                              "the output order.")
