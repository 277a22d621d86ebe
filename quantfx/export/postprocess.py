"""A detector's decode and NMS as float ONNX ops after its head tensors, so the exported file
is the whole detector (what TI's exporters write): ONNX Runtime returns its detections, and
TIDL, given the meta-architecture prototxt, replaces everything from the head tensors to the
`boxes`, `labels`, `scores` outputs with its own detection layer.

Batch 1 (as TIDL runs); boxes are (x1, y1, x2, y2) in input pixels.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor

from quantfx.errors import ExportError, InternalError
from quantfx.export.meta_arch import (
    MetaArch,
    SsdMetaArch,
    Yolov8MetaArch,
    YoloxMetaArch,
    check_heads,
    prototxt,
)
from quantfx.export.verify import onnxruntime_session
from quantfx.tidl.scope import DETECTION_PREFIX

OUTPUT_NAMES = ("boxes", "labels", "scores")
"""In this order (what TIDL's ONNX SSD post-processing expects)."""
PREFIX = DETECTION_PREFIX


class _Graph:
    """Nodes and constants appended to an existing graph, all named under PREFIX."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, PREFIX + name))
        return PREFIX + name

    def op(self, op_type: str, inputs: list[str], output: str | None = None,
           outputs: int = 1, **attributes: object) -> str | list[str]:
        self.count += 1
        names = [PREFIX + f"{op_type}_{self.count}_{index}" for index in range(outputs)]
        if output is not None:
            names = [output]
        self.nodes.append(helper.make_node(op_type, inputs, names,
                                           name=PREFIX + f"{op_type}_{self.count}",
                                           **attributes))
        return names[0] if outputs == 1 else names

    def slice_last(self, source: str, start: int, end: int) -> str:
        return self.op("Slice", [source, self.constant(f"start_{self.count}", np.array([start])),
                                 self.constant(f"end_{self.count}", np.array([end])),
                                 self.constant(f"axis_{self.count}", np.array([-1]))])


def _shapes(model: onnx.ModelProto) -> list[tuple[str, list[int]]]:
    return [(value.name, [dim.dim_value for dim in value.type.tensor_type.shape.dim])
            for value in model.graph.output]


SCORE_FUNCTIONS = ("Sigmoid", "Softmax", "HardSigmoid", "LogSoftmax")
"""Ops TIDL's detection layer applies itself (its score converter): a head must not."""


def _require_logits(model: onnx.ModelProto) -> None:
    """An ExportError where a head output comes out of a score function (through its Q/DQ):
    the detection layer would apply it a second time (every score above 0.5)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    for index, value in enumerate(model.graph.output):
        node = producers.get(value.name)
        while node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node = producers.get(node.input[0])
        if node is not None and node.op_type in SCORE_FUNCTIONS:
            raise ExportError(
                f"head output {index} ({value.name}) comes out of a {node.op_type}: TIDL's "
                "detection layer applies the score function itself, and so does the decode "
                "written here, so every score would be squashed twice. Return the head conv's "
                "raw output (the logits) from forward, and apply the function after the model.")


def _flatten(g: _Graph, head: str) -> str:
    """[1, C, H, W] -> [C, H * W]. Flatten, not Reshape or Transpose, comes first after the
    head's DequantizeLinear: ONNX Runtime's optimizer moves Q/DQ pairs through those two and
    fails on 16-bit ones (1.32: "output_dtype INT8 does not match y_zero_point type")."""
    return g.op("Flatten", [head], axis=2)


def _corners(g: _Graph, center: str, size: str) -> str:
    half = g.op("Mul", [size, g.constant(f"half_{g.count}", np.array(0.5, np.float32))])
    return g.op("Concat", [g.op("Sub", [center, half]), g.op("Add", [center, half])], axis=2)


def _yolox(g: _Graph, heads: list[tuple[str, list[int]]], arch: YoloxMetaArch
           ) -> tuple[str, str, np.ndarray]:
    """(boxes [1, K, 4], scores [1, K, C], label of each score column)."""
    flat = [_flatten(g, name) for name, _ in heads]  # [D, H * W] each
    cells, strides = _cells(heads, arch.strides)
    joined = g.op("Unsqueeze", [g.op("Transpose", [g.op("Concat", flat, axis=1)], perm=[1, 0]),
                                g.constant("zero_axis", np.array([0]))])  # [1, K, D]
    grid = g.constant("grid", cells[None].astype(np.float32))
    stride = g.constant("stride", strides[None].astype(np.float32))
    center = g.op("Mul", [g.op("Add", [g.slice_last(joined, 0, 2), grid]), stride])
    size = g.op("Mul", [g.op("Exp", [g.slice_last(joined, 2, 4)]), stride])
    objectness = g.op("Sigmoid", [g.slice_last(joined, 4, 5)])
    classes = g.op("Sigmoid", [g.slice_last(joined, 5, 5 + arch.num_classes)])
    scores = g.op("Mul", [objectness, classes])
    return _corners(g, center, size), scores, np.arange(arch.num_classes)


def _cells(heads: list[tuple[str, list[int]]], strides: tuple[int, ...]
           ) -> tuple[np.ndarray, np.ndarray]:
    """(each cell's (column, row) [K, 2], its stride [K, 1]), level by level, row-major."""
    cells, cell_strides = [], []
    for (_, shape), stride in zip(heads, strides):
        height, width = shape[2:]
        rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        cells.append(np.stack([columns.ravel(), rows.ravel()], -1))
        cell_strides.append(np.full((height * width, 1), stride))
    return np.concatenate(cells), np.concatenate(cell_strides)


def _yolov8(g: _Graph, heads: list[tuple[str, list[int]]], arch: Yolov8MetaArch
            ) -> tuple[str, str, np.ndarray]:
    """(boxes [1, K, 4], scores [1, K, C], label of each score column): DFL (softmax over each
    side's bins, then their expectation) and dist2bbox, as CODE_TYPE_DIST2BBOX decodes."""
    bins = g.constant("bins", np.arange(arch.reg_max, dtype=np.float32)[None])  # [1, R]
    distances = []
    for name, _ in heads[1::2]:
        if arch.reg_max == 1:  # no distribution: the box conv gives the distances themselves
            distances.append(_flatten(g, name))
            continue
        logits = g.op("Reshape", [_flatten(g, name), g.constant(
            f"shape_{g.count}", np.array([4, arch.reg_max, -1]))])  # [4, R, H * W]
        expected = g.op("MatMul", [bins, g.op("Softmax", [logits], axis=1)])  # [4, 1, H * W]
        distances.append(g.op("Squeeze", [expected, g.constant(f"axis_{g.count}",
                                                               np.array([1]))]))
    classes = [_flatten(g, name) for name, _ in heads[0::2]]  # [C, H * W] each
    cells, cell_strides = _cells(heads[0::2], arch.strides)  # centres at (i + 0.5) * stride
    centers = ((cells + 0.5) * cell_strides)[None].astype(np.float32)
    strides = cell_strides[:, 0][None].astype(np.float32)
    scaled = g.op("Mul", [g.op("Concat", distances, axis=1), g.constant("stride", strides)])
    zero = g.constant("zero_axis", np.array([0]))
    sides = g.op("Unsqueeze", [g.op("Transpose", [scaled], perm=[1, 0]), zero])  # [1, K, 4]
    center = g.constant("centers", centers)
    boxes = g.op("Concat", [g.op("Sub", [center, g.slice_last(sides, 0, 2)]),
                            g.op("Add", [center, g.slice_last(sides, 2, 4)])], axis=2)
    logits = g.op("Transpose", [g.op("Concat", classes, axis=1)], perm=[1, 0])  # [K, C]
    scores = g.op("Unsqueeze", [g.op("Sigmoid", [logits]), zero])
    return boxes, scores, np.arange(arch.num_classes)


def _ssd(g: _Graph, heads: list[tuple[str, list[int]]], arch: SsdMetaArch
         ) -> tuple[str, str, np.ndarray]:
    """(boxes [1, K, 4], scores [1, K, C'] without the background column, their labels)."""
    levels = len(arch.priors)

    def flatten(name: str, shape: list[int], columns: int) -> str:
        moved = g.op("Transpose", [_flatten(g, name)], perm=[1, 0])  # [H * W, A * columns]
        count = shape[1] * shape[2] * shape[3] // columns
        return g.op("Reshape", [moved, g.constant(f"shape_{g.count}",
                                                  np.array([1, count, columns]))])

    locations = g.op("Concat", [flatten(name, shape, 4) for name, shape in heads[:levels]],
                     axis=1)
    logits = g.op("Concat", [flatten(name, shape, arch.num_classes)
                             for name, shape in heads[levels:]], axis=1)
    anchors = np.concatenate([prior.anchors(shape[2], shape[3]).numpy()
                              for prior, (_, shape) in zip(arch.priors, heads[:levels])])
    anchor_centers = g.constant("anchor_centers", anchors[None, :, :2].astype(np.float32))
    anchor_sizes = g.constant("anchor_sizes", anchors[None, :, 2:].astype(np.float32))
    variance = np.array(arch.variance, np.float32)
    offsets = g.op("Mul", [g.slice_last(locations, 0, 2),
                           g.constant("variance_center", variance[:2])])
    center = g.op("Add", [g.op("Mul", [offsets, anchor_sizes]), anchor_centers])
    scaled = g.op("Mul", [g.slice_last(locations, 2, 4), g.constant("variance_size",
                                                                    variance[2:])])
    size = g.op("Mul", [g.op("Exp", [scaled]), anchor_sizes])
    probabilities = g.op("Softmax", [logits], axis=-1)
    labels = np.array([label for label in range(arch.num_classes)
                       if label != arch.background_label_id])
    scores = g.op("Gather", [probabilities, g.constant("foreground", labels)], axis=2)
    return _corners(g, center, size), scores, labels


DECODERS = {YoloxMetaArch: _yolox, Yolov8MetaArch: _yolov8, SsdMetaArch: _ssd}


def append_postprocess(model: onnx.ModelProto, arch: MetaArch) -> onnx.ModelProto:
    """A copy of `model` (its outputs: the head tensors) with decode and NMS after them and
    `OUTPUT_NAMES` added as outputs after the head tensors."""
    heads = _shapes(model)
    g = _Graph()
    boxes, scores, label_of_column = DECODERS[type(arch)](g, heads, arch)
    by_class = g.op("Transpose", [scores], perm=[0, 2, 1])  # [1, C, K]
    selected = g.op("NonMaxSuppression", [
        boxes, by_class, g.constant("top_k", np.array([arch.top_k])),
        g.constant("nms_threshold", np.array([arch.nms_threshold], np.float32)),
        g.constant("confidence_threshold", np.array([arch.confidence_threshold], np.float32))])
    column = g.op("Gather", [selected, g.constant("one", np.array(1))], axis=1)
    box_index = g.op("Gather", [selected, g.constant("two", np.array(2))], axis=1)
    zero = g.constant("zero", np.array([0]))
    chosen_boxes = g.op("Gather", [g.op("Squeeze", [boxes, zero]), box_index], axis=0)
    pairs = g.slice_last(selected, 1, 3)
    chosen_scores = g.op("GatherND", [g.op("Squeeze", [by_class, zero]), pairs])
    count = g.op("Min", [g.op("Shape", [chosen_scores]),
                         g.constant("keep_top_k", np.array([arch.keep_top_k]))])
    top_scores, order = g.op("TopK", [chosen_scores, count], outputs=2, axis=0, largest=1,
                             sorted=1)
    taken = {value.name for value in model.graph.output} | {
        output for node in model.graph.node for output in node.output}
    names = [name if name not in taken else PREFIX + name for name in OUTPUT_NAMES]
    g.op("Gather", [chosen_boxes, order], output=names[0], axis=0)
    labels = g.op("Gather", [g.constant("labels", label_of_column.astype(np.int64)), column],
                  axis=0)
    g.op("Gather", [labels, order], output=names[1], axis=0)
    g.op("Identity", [top_scores], output=names[2])
    result = onnx.ModelProto()
    result.CopyFrom(model)
    result.graph.node.extend(g.nodes)
    result.graph.initializer.extend(g.initializers)
    result.graph.output.extend([
        helper.make_tensor_value_info(names[0], TensorProto.FLOAT, ["detections", 4]),
        helper.make_tensor_value_info(names[1], TensorProto.INT64, ["detections"]),
        helper.make_tensor_value_info(names[2], TensorProto.FLOAT, ["detections"])])
    onnx.checker.check_model(result)
    return result


def check_detection(detection: Any, legacy: bool, inputs: tuple[Tensor, ...]) -> None:
    """An ExportError unless `detection` is None or a meta-architecture this export can write."""
    if detection is None:
        return
    if not isinstance(detection, tuple(DECODERS)):
        raise ExportError(f"detection must be a quantfx.YoloxMetaArch, quantfx.Yolov8MetaArch or "
                          f"quantfx.SsdMetaArch (or None), got {type(detection).__name__}.")
    if legacy:
        raise ExportError("detection export writes a QDQ file; use legacy=False.")
    if inputs[0].dim() != 4 or any(tensor.shape[0] != 1 for tensor in inputs):
        raise ExportError(f"detection export runs at batch 1 on an image [1, C, H, W] (as "
                          f"TIDL does); example input 0 is {tuple(inputs[0].shape)}.")


def whole_detector(network: onnx.ModelProto, detection: MetaArch | None,
                   inputs: tuple[Tensor, ...], path: str, options: dict[str, Any]
                   ) -> dict[str, Any] | None:
    """The whole detector's ONNX model, the prototxt (path and text) and the options entries
    that pair them (added to `options`), or None without `detection`."""
    if detection is None:
        return None
    shapes = _shapes(network)
    in_height, in_width = inputs[0].shape[-2:]
    check_heads(detection, shapes, int(in_height), int(in_width))
    _require_logits(network)
    whole = append_postprocess(network, detection)
    heads = [name for name, _ in shapes]
    outputs = [value.name for value in whole.graph.output][len(heads):]
    prototxt_path = os.path.splitext(path)[0] + ".prototxt"
    options["object_detection:meta_arch_type"] = detection.META_ARCH_TYPE
    options["object_detection:meta_layers_names_list"] = os.path.basename(prototxt_path)
    return {"model": whole, "path": prototxt_path, "heads": heads, "outputs": outputs,
            "text": prototxt(detection, heads, outputs, int(in_height), int(in_width))}


def run_detector(path: str, inputs: tuple[Tensor, ...], threads: int) -> None:
    """Run the whole detector file once in both ONNX Runtime sessions: the heads were verified
    bit for bit already; here the file with decode and NMS after them must load and run."""
    for optimized in (False, True):
        try:
            session = onnxruntime_session(path, threads, optimized=optimized)
            session.run(None, {item.name: tensor.numpy() for item, tensor in
                               zip(session.get_inputs(), inputs)})
        except Exception as error:  # noqa: BLE001 - ONNX Runtime's message is the news
            raise InternalError(f"the detector file with decode and NMS does not run "
                                f"in ONNX Runtime ({'optimized' if optimized else 'reference'} "
                                f"session): {str(error).splitlines()[0]}. Nothing was written."
                                ) from error
