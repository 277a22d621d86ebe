"""TIDL's detection export: head tensors verified, decode + NMS as float ONNX ops, the
meta-architecture prototxt (fields as ../shared/TIDL_FACTS.md §4 lists them), for the YOLOX
kind (the repo's detector, benchmarks/yolo.py), the YOLOv8 kind (benchmarks/yolov8.py) and the
SSD kind (torchvision SSDlite)."""

from __future__ import annotations

import json
import os
import re
import stat
import warnings

import numpy as np
import onnx
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms

import quantfx as qf
from benchmarks import yolo, yolov8
from benchmarks.detection_data import mean_average_precision
from quantfx.export.verify import onnxruntime_session


def _converted(model, example, config=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = qf.prepare(model, (example,), config or qf.QuantConfig(progress=False))
    torch.manual_seed(1)
    qf.calibrate(prepared, [torch.randn(4, *example.shape[1:]) for _ in range(2)])
    return qf.convert(prepared)


@pytest.fixture(scope="module")
def tiny_yolox():
    torch.manual_seed(0)
    model = yolo.TinyYolox().eval()
    with torch.no_grad():  # head logits spread wide enough that scores rarely tie
        for head in model.heads:
            for conv in (head.box, head.objectness, head.classes):
                conv.weight.normal_(0.0, 0.3)
            head.box.weight.mul_(0.1)
    return model


def _fields(text: str, name: str) -> list[str]:
    return re.findall(rf"\b{name}: \"?([^\"\n]+)\"?", text)


def _run(path, image):
    session = onnxruntime_session(str(path))
    return session.run(None, {session.get_inputs()[0].name: image.numpy()})


def _threshold_keeping(candidates: torch.Tensor, low: int, high: int) -> float:
    """A score threshold between two distinct candidates keeping low to high - 1 of them."""
    distinct = torch.unique(candidates.flatten()).flip(0)
    counts = torch.tensor([int((candidates >= value).sum()) for value in distinct[:high + 10]])
    last = int(torch.nonzero((counts >= low) & (counts < high)).max())
    return float((distinct[last] + distinct[last + 1]) / 2)


def _same_detections(outputs, expected) -> None:
    found = sorted(zip(outputs[-2].tolist(), np.round(outputs[-1], 5).tolist(),
                       np.round(outputs[-3], 3).tolist()))
    wanted = sorted(zip(expected["labels"].tolist(), np.round(expected["scores"].numpy(),
                                                              5).tolist(),
                        np.round(expected["boxes"].numpy(), 3).tolist()))
    assert found == wanted


def test_yolox_export_writes_heads_decode_and_the_prototxt(tmp_path, tiny_yolox) -> None:
    converted = _converted(tiny_yolox, torch.randn(1, 1, 64, 64),
                           qf.QuantConfig(sixteen_bit_layers=("heads",), progress=False))
    image = torch.randn(1, 1, 64, 64)
    with torch.no_grad():  # a threshold that keeps 10 to 49 candidates (none cut by keep_top_k)
        _, objectness, logits = yolo.decode(converted(image))
        candidates = objectness.sigmoid()[..., None] * logits.sigmoid()
    threshold = _threshold_keeping(candidates, 10, 50)
    arch = qf.YoloxMetaArch(strides=yolo.STRIDES, num_classes=10,
                            confidence_threshold=threshold, nms_threshold=0.5, top_k=100,
                            keep_top_k=50)
    report = qf.export_onnx(converted, image, tmp_path / "det.onnx", detection=arch)
    assert report.fraction_identical == 1.0 and report.optimized_fraction_identical == 1.0
    text = (tmp_path / "det.prototxt").read_text()
    assert report.prototxt_path == str(tmp_path / "det.prototxt")
    assert text.startswith('name: "yolox"\ntidl_yolo {')
    assert _fields(text, "input") == report.head_outputs and len(report.head_outputs) == 2
    assert _fields(text, "anchor_width") == ["8.0", "16.0"] == _fields(text, "anchor_height")
    assert _fields(text, "code_type") == ["CODE_TYPE_YOLO_X"]
    assert _fields(text, "num_classes") == ["10"] and _fields(text, "background_label_id") == [
        "-1"]
    assert float(_fields(text, "confidence_threshold")[0]) == pytest.approx(threshold, rel=1e-5)
    assert _fields(text, "keep_top_k") == ["50"] and _fields(text, "top_k") == ["100"]
    assert _fields(text, "in_width") == ["64"] == _fields(text, "in_height")
    assert _fields(text, "output") == ["boxes", "labels", "scores"] == report.detection_outputs
    options = json.loads((tmp_path / "det.tidl.json").read_text())
    assert options["object_detection:meta_arch_type"] == 6
    assert options["object_detection:meta_layers_names_list"] == "det.prototxt"
    assert {"heads_0_box", "heads_1_classes"} <= set(report.sixteen_bit_params)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "det.prototxt").st_mode) == 0o666 & ~umask
    # the file's decode + NMS give the detections the repo's Python decode gives
    outputs = _run(tmp_path / "det.onnx", image)
    with torch.no_grad():
        expected = yolo.detect(converted(image), score_threshold=threshold, nms_threshold=0.5,
                               keep=50)[0]
    assert 3 < len(expected["scores"]) < 50  # none cut by keep_top_k: the same set in any order
    _same_detections(outputs, expected)
    # exported again there without detection=: the prototxt left beside it is named, not kept
    with pytest.warns(qf.QuantFxWarning, match="det.prototxt' sits beside this export"):
        qf.export_onnx(converted, image, tmp_path / "det.onnx")


def test_yolov8_export_decodes_dfl_and_writes_the_caffe_ssd_prototxt(tmp_path) -> None:
    torch.manual_seed(0)
    model = yolov8.TinyYolov8().eval()
    with torch.no_grad():  # class logits spread wide enough that scores rarely tie
        for head in model.heads:
            head.class_branch[-1].weight.normal_(0.0, 0.3)
    converted = _converted(model, torch.randn(1, 1, 64, 64),
                           qf.QuantConfig(sixteen_bit_layers=("heads",), progress=False))
    image = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        _, logits, _ = yolov8.decode(converted(image))
    threshold = _threshold_keeping(logits.sigmoid(), 10, 50)
    arch = qf.Yolov8MetaArch(strides=yolov8.STRIDES, num_classes=10, reg_max=yolov8.REG_MAX,
                             confidence_threshold=threshold, nms_threshold=0.5, top_k=100,
                             keep_top_k=50)
    wrong = qf.Yolov8MetaArch(strides=yolov8.STRIDES, num_classes=10, reg_max=8)
    with pytest.raises(qf.ExportError, match=r"expects \[1, 32, 8, 8\].*reg_max"):
        qf.export_onnx(converted, image, tmp_path / "v8.onnx", detection=wrong)
    report = qf.export_onnx(converted, image, tmp_path / "v8.onnx", detection=arch)
    assert report.fraction_identical == 1.0 and report.optimized_fraction_identical == 1.0
    checked = qf.check_tidl(tmp_path / "v8.onnx")  # the file judges as the export did: the
    assert (checked.offloaded, checked.total) == (report.tidl.offloaded, report.tidl.total)
    assert len(checked.findings) == len(report.tidl.findings)  # decode + NMS left to TIDL
    assert checked.detection_post_processing > 10 and "decode/NMS" in checked.summary()
    text = (tmp_path / "v8.prototxt").read_text()
    assert text.startswith('name: "yolov8"\ncaffe_ssd {')
    heads = report.head_outputs
    assert len(heads) == 4 and _fields(text, "class_input") == heads[0::2]
    assert _fields(text, "box_input") == heads[1::2]
    assert _fields(text, "code_type") == ["CODE_TYPE_DIST2BBOX"]
    assert _fields(text, "score_converter") == ["SIGMOID"]
    assert _fields(text, "background_label_id") == ["-1"] and "prior_box_param" not in text
    assert _fields(text, "output") == ["boxes", "labels", "scores"]
    options = json.loads((tmp_path / "v8.tidl.json").read_text())
    assert options["object_detection:meta_arch_type"] == 8
    assert options["object_detection:meta_layers_names_list"] == "v8.prototxt"
    with torch.no_grad():
        expected = yolov8.detect(converted(image), score_threshold=threshold,
                                 nms_threshold=0.5, keep=50)[0]
    assert 3 < len(expected["scores"]) < 50
    _same_detections(_run(tmp_path / "v8.onnx", image), expected)


def test_sixteen_bit_heads_are_the_convs_that_reach_the_outputs(tiny_yolox) -> None:
    converted = _converted(tiny_yolox, torch.randn(1, 1, 64, 64),
                           qf.QuantConfig(sixteen_bit_layers=("heads",), progress=False))
    wide = {name for name, module in converted.named_modules()
            if getattr(module, "weight_bits", None) == 16}
    assert wide == {f"heads.{level}.{conv}" for level in (0, 1)
                    for conv in ("box", "objectness", "classes")}


@pytest.mark.parametrize("change, message", [
    (dict(num_classes=9), "expects \\[1, 14, 8, 8\\]"),
    (dict(strides=(8,)), "expects 1 model outputs"),
    (dict(strides=(16, 8)), "expects \\[1, 15, 4, 4\\]"),
    (dict(kind=qf.Yolov8MetaArch), "expects 4 model outputs \\(per stride the class conv"),
])
def test_heads_that_do_not_match_are_refused_and_nothing_is_written(tmp_path, tiny_yolox,
                                                                   change, message) -> None:
    converted = _converted(tiny_yolox, torch.randn(1, 1, 64, 64))
    options = dict(change)
    kind = options.pop("kind", qf.YoloxMetaArch)
    arch = kind(**{"strides": (8, 16), "num_classes": 10, **options})
    with pytest.raises(qf.ExportError, match=message):
        qf.export_onnx(converted, torch.randn(1, 1, 64, 64), tmp_path / "det.onnx",
                       detection=arch)
    assert list(tmp_path.iterdir()) == []


class Squashed(nn.Module):
    """A detector whose heads are already squashed: the detection layer would do it twice."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x):
        return tuple(torch.sigmoid(head) for head in self.detector(x))


def test_heads_that_are_not_logits_are_refused(tmp_path, tiny_yolox) -> None:
    converted = _converted(Squashed(tiny_yolox).eval(), torch.randn(1, 1, 64, 64))
    with pytest.raises(qf.ExportError, match=r"head output 0 .* comes out of a Sigmoid"):
        qf.export_onnx(converted, torch.randn(1, 1, 64, 64), tmp_path / "det.onnx",
                       detection=qf.YoloxMetaArch(strides=(8, 16), num_classes=10))
    assert list(tmp_path.iterdir()) == []


class WithScore(nn.Module):
    """The heads and a scalar beside them (a mean objectness a user logs)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x):
        heads = self.detector(x)
        return (*heads, heads[0].mean())


def test_a_scalar_beside_the_heads_is_counted_not_called_dynamic(tmp_path, tiny_yolox) -> None:
    """A scalar output has a static shape (rank 0): export said 'no static shape'; with
    detection= the model gets the head-count message, and without it the file is written."""
    example = torch.randn(1, 1, 64, 64)
    converted = _converted(WithScore(tiny_yolox).eval(), example)
    with pytest.raises(qf.ExportError, match="expects 2 model outputs .* the model has 3"):
        qf.export_onnx(converted, example, tmp_path / "det.onnx",
                       detection=qf.YoloxMetaArch(strides=(8, 16), num_classes=10))
    report = qf.export_onnx(converted, example, tmp_path / "plain.onnx")
    assert onnx.load(report.path).graph.output[-1].type.tensor_type.shape.dim == []


def test_bad_detection_options_are_quantfx_errors(tmp_path, tiny_yolox) -> None:
    """Export misuse is an ExportError; a bad meta-architecture field is a ConfigError (a bad
    argument, as for QuantConfig), raised by the constructor."""
    converted = _converted(tiny_yolox, torch.randn(1, 1, 64, 64))
    arch = qf.YoloxMetaArch(strides=(8, 16), num_classes=10)
    for kwargs, message in [(dict(detection="yolox"), "must be a quantfx.YoloxMetaArch"),
                            (dict(detection=arch, legacy=True), "legacy=False")]:
        with pytest.raises(qf.ExportError, match=message):
            qf.export_onnx(converted, torch.randn(1, 1, 64, 64), tmp_path / "d.onnx", **kwargs)
    with pytest.raises(qf.ExportError, match="batch 1"):
        qf.export_onnx(converted, torch.randn(2, 1, 64, 64), tmp_path / "d.onnx",
                       detection=arch)
    for bad in [dict(strides=()), dict(strides=(8, -16)), dict(strides="8"),
                dict(num_classes=0), dict(confidence_threshold=1.5),
                dict(nms_threshold=0), dict(top_k=True), dict(keep_top_k=2.5)]:
        named = next(iter(bad))
        with pytest.raises(qf.ConfigError, match=rf"(?s){named}.*(e\.g\.|such as)"):
            qf.YoloxMetaArch(**{"strides": (8, 16), "num_classes": 10, **bad})
    for bad in [dict(reg_max=0), dict(reg_max="16"), dict(strides=[8, 16.0])]:
        named = next(iter(bad))
        with pytest.raises(qf.ConfigError, match=rf"(?s){named}.*(e\.g\.|such as)"):
            qf.Yolov8MetaArch(**{"strides": (8, 16), "num_classes": 10, **bad})
    with pytest.raises(qf.ConfigError, match="variance needs 4"):
        qf.SsdMetaArch(priors=[qf.PriorBoxes(30, 60, (2,), 16)], num_classes=3,
                       variance=(0.1, 0.2))
    with pytest.raises(qf.ConfigError, match="not a class"):
        qf.SsdMetaArch(priors=[qf.PriorBoxes(30, 60, (2,), 16)], num_classes=3,
                       background_label_id=3)
    assert list(tmp_path.iterdir()) == []


def _reference_ssd(outputs, arch, anchors):
    """The caffe SSD decode written out: CENTER_SIZE with variances, softmax, per-class NMS."""
    levels = len(arch.priors)
    locations = torch.cat([out.permute(0, 2, 3, 1).reshape(1, -1, 4) for out in
                           outputs[:levels]], 1)[0]
    logits = torch.cat([out.permute(0, 2, 3, 1).reshape(1, -1, arch.num_classes) for out in
                        outputs[levels:]], 1)[0]
    variance = torch.tensor(arch.variance)
    center = locations[:, :2] * variance[:2] * anchors[:, 2:] + anchors[:, :2]
    size = torch.exp(locations[:, 2:] * variance[2:]) * anchors[:, 2:]
    boxes = torch.cat([center - size / 2, center + size / 2], 1)
    scores = logits.softmax(-1)[:, 1:]
    index, column = torch.nonzero(scores > arch.confidence_threshold, as_tuple=True)
    kept = batched_nms(boxes[index], scores[index, column], column, arch.nms_threshold)
    kept = kept[:arch.keep_top_k]
    return boxes[index][kept], column[kept] + 1, scores[index, column][kept]


def test_torchvision_ssdlite_exports_as_caffe_ssd(tmp_path) -> None:
    torch.manual_seed(0)
    detector = torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None,
                                            weights_backbone=None).eval()
    with pytest.warns(UserWarning, match="anchor shapes are wider than the image"):
        arch = qf.SsdMetaArch.from_torchvision(detector, confidence_threshold=0.0115)
    image = torch.rand(1, 3, 320, 320) * 2 - 1
    features = list(detector.backbone(image).values())
    anchors = torch.cat([prior.anchors(f.shape[2], f.shape[3]) for prior, f in
                         zip(arch.priors, features)]).float()
    # caffe's PriorBox rules give torchvision's anchors, except the ones torchvision clamps
    theirs = detector.anchor_generator(ImageList(image, [(320, 320)]), features)[0]
    corners = torch.cat([anchors[:, :2] - anchors[:, 2:] / 2,
                         anchors[:, :2] + anchors[:, 2:] / 2], 1)
    differ = (corners - theirs).abs().amax(1) > 1e-3
    assert len(anchors) == len(theirs) == 3234 and 0 < int(differ.sum()) <= 60
    assert bool((anchors[differ, 2:].amax(1) > 320).all())  # only anchors wider than the image
    network = qf.TorchvisionSsdNetwork(detector).eval()
    converted = _converted(network, image)
    report = qf.export_onnx(converted, image, tmp_path / "ssd.onnx", detection=arch)
    assert report.fraction_identical == 1.0 and len(report.head_outputs) == 12
    text = (tmp_path / "ssd.prototxt").read_text()
    assert text.startswith('name: "ssd"\ncaffe_ssd {')
    assert _fields(text, "box_input") == report.head_outputs[:6]
    assert _fields(text, "class_input") == report.head_outputs[6:]
    assert _fields(text, "step") == ["16.0", "32.0", "64.0", "106.667", "160.0", "320.0"]
    assert _fields(text, "min_size")[0] == "64.0" and _fields(text, "aspect_ratio")[:2] == [
        "2.0", "3.0"]
    assert _fields(text, "variance")[:4] == ["0.1", "0.1", "0.2", "0.2"]
    assert _fields(text, "code_type") == ["CENTER_SIZE"]
    assert _fields(text, "num_classes") == ["91"] and _fields(text, "background_label_id") == [
        "0"]
    assert _fields(text, "output") == ["boxes", "labels", "scores"]
    options = json.loads((tmp_path / "ssd.tidl.json").read_text())
    assert options["object_detection:meta_arch_type"] == 3
    assert len(_run(tmp_path / "ssd.onnx", image)) == 12 + 3


class TwoLevelSsd(torch.nn.Module):
    """Box and class convs straight on the image at strides 8 and 16 (outputs spread wide)."""

    def __init__(self, anchors: tuple[int, int], classes: int) -> None:
        super().__init__()
        self.boxes = torch.nn.ModuleList([torch.nn.Conv2d(3, count * 4, 8, 8 * (level + 1))
                                          for level, count in enumerate(anchors)])
        self.classes = torch.nn.ModuleList([torch.nn.Conv2d(3, count * classes, 8,
                                                            8 * (level + 1))
                                            for level, count in enumerate(anchors)])

    def forward(self, x):
        return tuple([conv(x) for conv in self.boxes] + [conv(x) for conv in self.classes])


def test_ssd_decode_and_nms_in_the_file_match_the_caffe_rules(tmp_path) -> None:
    priors = [qf.PriorBoxes(12.0, 24.0, (2.0,), 8.0), qf.PriorBoxes(24.0, None, (3.0,), 16.0,
                                                                    flip=False)]
    arch = qf.SsdMetaArch(priors=priors, num_classes=4, confidence_threshold=0.55,
                          nms_threshold=0.5, keep_top_k=200)
    torch.manual_seed(0)
    model = TwoLevelSsd((priors[0].boxes_per_cell, priors[1].boxes_per_cell), 4).eval()
    image = torch.randn(1, 3, 64, 64)
    converted = _converted(model, image)
    report = qf.export_onnx(converted, image, tmp_path / "ssd.onnx", detection=arch)
    assert report.fraction_identical == 1.0
    anchors = torch.cat([prior.anchors(64 // prior.step, 64 // prior.step)
                         for prior in priors]).float()
    assert anchors.shape == (8 * 8 * 4 + 4 * 4 * 2, 4)
    boxes, labels, scores = _run(tmp_path / "ssd.onnx", image)[-3:]
    with torch.no_grad():
        expected = _reference_ssd(converted(image), arch, anchors)
    assert 5 < len(scores) < arch.keep_top_k and set(labels.tolist()) <= {1, 2, 3}
    found = sorted(zip(labels.tolist(), np.round(scores, 4).tolist(),
                       np.round(boxes, 2).tolist()))
    wanted = sorted(zip(expected[1].tolist(), np.round(expected[2].numpy(), 4).tolist(),
                        np.round(expected[0].numpy(), 2).tolist()))
    assert found == wanted


def test_mean_average_precision_counts_ranks_and_matches() -> None:
    data = type("Data", (), {})()
    data.boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[20.0, 20.0, 30.0, 30.0]])]
    data.labels = [torch.tensor([0]), torch.tensor([1])]
    perfect = [{"boxes": boxes, "scores": torch.tensor([0.9]), "labels": labels}
               for boxes, labels in zip(data.boxes, data.labels)]
    assert mean_average_precision(perfect, data, 2) == pytest.approx(100.0)
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
              "labels": torch.zeros(0, dtype=torch.int64)} for _ in range(2)]
    assert mean_average_precision(empty, data, 2) == 0.0
    # class 0: a false positive ranked above the true one halves its precision; class 1 missed
    shifted = [{"boxes": torch.tensor([[40.0, 40.0, 50.0, 50.0], [0.0, 0.0, 10.0, 9.0]]),
                "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0])},
               {"boxes": torch.tensor([[20.0, 20.0, 30.0, 30.0]]), "scores": torch.tensor([0.7]),
                "labels": torch.tensor([0])}]
    assert mean_average_precision(shifted, data, 2) == pytest.approx((50.0 + 0.0) / 2)
