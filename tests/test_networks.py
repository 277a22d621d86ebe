"""The networks of detectors users bring (quantfx/export/networks.py): an ultralytics
YOLOv8-family DetectionModel, by its structure (ultralytics itself is not installed here: the
stand-in below has its attributes; docs/detection.md gives the figures measured on the real
yolov8n), traced, quantized and exported whole with `Yolov8MetaArch.from_ultralytics`."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import quantfx as qf
from quantfx.export.verify import onnxruntime_session


class _Concat(nn.Module):
    def forward(self, tensors):
        return torch.cat(tensors, 1)


class _Detect(nn.Module):
    """ultralytics' Detect, as its attributes: per level a box branch (cv2) and a class branch
    (cv3), the layers it reads (f), classes, DFL bins, strides."""

    def __init__(self, reg_max: int) -> None:
        super().__init__()
        self.f, self.nc, self.reg_max = [1, 4], 3, reg_max
        self.stride = torch.tensor([8.0, 16.0])
        self.cv2 = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(),
                                               nn.Conv2d(8, 4 * reg_max, 1)) for _ in range(2))
        self.cv3 = nn.ModuleList(nn.Conv2d(8, 3, 1) for _ in range(2))


class _DetectionModel(nn.Module):
    """Layers routed by `f` (-1: the previous one; indices: earlier outputs, a list for a
    Concat), as ultralytics' DetectionModel runs them; the head reads layer 1 (stride 8) and
    layer 4 (stride 16)."""

    def __init__(self, reg_max: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.ReLU()),
                  nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU()),
                  nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU()),
                  _Concat(), nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU()), _Detect(reg_max)]
        for index, (layer, source) in enumerate(zip(layers, [-1, -1, -1, [-1, 2], -1, None])):
            layer.f = layer.f if source is None else source
            layer.i = index
        self.model = nn.Sequential(*layers)
        self.save = [1, 2, 4]

    def heads(self, x):
        """The head tensors, computed by hand: what the network must return."""
        fine = self.model[1](self.model[0](x))
        coarse = self.model[2](fine)
        joined = self.model[4](self.model[3]([coarse, coarse]))
        detect = self.model[5]
        return (detect.cv3[0](fine), detect.cv2[0](fine), detect.cv3[1](joined),
                detect.cv2[1](joined))


@pytest.mark.parametrize("reg_max", [4, 1])
def test_an_ultralytics_detector_exports_whole_as_meta_arch_8(tmp_path, reg_max) -> None:
    model = _DetectionModel(reg_max).eval()
    network = qf.UltralyticsYolov8Network(model).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, wanted in zip(network(image), model.heads(image), strict=True):
            torch.testing.assert_close(got, wanted)
    arch = qf.Yolov8MetaArch.from_ultralytics(model, confidence_threshold=0.2)
    assert (arch.strides, arch.num_classes, arch.reg_max) == ((8, 16), 3, reg_max)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = qf.prepare(network, (image,), qf.QuantConfig(progress=False))
    qf.calibrate(prepared, [torch.randn(4, 3, 64, 64) for _ in range(2)])
    converted = qf.convert(prepared)
    report = qf.export_onnx(converted, image, tmp_path / "ul.onnx", detection=arch)
    assert report.fraction_identical == 1.0
    session = onnxruntime_session(str(tmp_path / "ul.onnx"))
    boxes, labels, scores = session.run(None, {session.get_inputs()[0].name: image.numpy()})[-3:]
    with torch.no_grad():
        heads = converted(image)
    expected = _reference_boxes(heads, arch)
    assert len(scores) > 0
    for box, label, score in zip(boxes, labels, scores):  # each kept box is a decoded one
        distance = np.abs(expected[0] - box).max(1) + np.abs(expected[1][:, label] - score)
        assert distance.min() < 1e-3


def _reference_boxes(heads, arch):
    """(boxes [K, 4], scores [K, C]) decoded as ultralytics does: each side's DFL expectation
    (the raw distances with reg_max 1) times the stride, from the cell centre."""
    boxes, scores = [], []
    for level, stride in enumerate(arch.strides):
        classes, distances = heads[2 * level], heads[2 * level + 1]
        height, width = classes.shape[2:]
        rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        center = (torch.stack([columns.flatten(), rows.flatten()], 1) + 0.5) * stride
        sides = distances.reshape(4, arch.reg_max, -1)
        if arch.reg_max > 1:
            sides = (sides.softmax(1) * torch.arange(arch.reg_max)[None, :, None]).sum(1)
        sides = sides.reshape(4, -1).T * stride
        boxes.append(torch.cat([center - sides[:, :2], center + sides[:, 2:]], 1))
        scores.append(classes.reshape(classes.shape[1], -1).T.sigmoid())
    return torch.cat(boxes).numpy(), torch.cat(scores).numpy()


def test_models_that_are_not_ultralytics_detectors_are_refused() -> None:
    with pytest.raises(qf.ExportError, match="not an ultralytics YOLOv8-family detector"):
        qf.UltralyticsYolov8Network(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)))
    model = _DetectionModel()
    model.model[-1].end2end = True
    with pytest.raises(qf.ExportError, match="end-to-end"):
        qf.Yolov8MetaArch.from_ultralytics(model)
