"""Partial quantization: named (or automatically found) parts quantized, the rest float."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quantfx as qf
from quantfx.layers import FakeQuantLayer, IntegerLayer
from quantfx.quantizers import CalibrationQuantizer
from tests.helpers import randomize_batchnorm

CONFIG = dict(progress=False)


class TinyDetector(nn.Module):
    """Takes a list of images (as torchvision detectors do) and post-processes with a
    data-dependent Python loop: it does not trace whole; its backbone and head do."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, 5, 1)  # 4 box offsets + 1 score per position

    def forward(self, images: list[torch.Tensor]):
        raw = self.head(self.backbone(torch.stack(images)))
        return raw, self.postprocess(raw)

    @staticmethod
    def postprocess(raw: torch.Tensor) -> list[torch.Tensor]:
        detections = []
        for scores in raw[:, 4]:  # data-dependent: how many pass depends on the values
            flat = scores.flatten()
            keep = flat > 0
            detections.append(flat[keep].sort(descending=True).values[:5] if keep.any()
                              else flat[:0])
        return detections


def _images(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 32, 32, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def model() -> TinyDetector:
    torch.manual_seed(0)
    return randomize_batchnorm(TinyDetector()).eval()


def _calibration() -> list[tuple[list[torch.Tensor]]]:
    return [(_images(4, seed),) for seed in range(3)]


def test_named_parts_are_quantized_and_the_rest_is_untouched_float(model):
    with pytest.raises(qf.PrepareError, match="quantize_only='auto'"):
        qf.prepare(model, (_images(1, 0),), qf.QuantConfig(**CONFIG))
    config = qf.QuantConfig(quantize_only=("backbone", "head"), **CONFIG)
    prepared = qf.prepare(model, (_images(1, 0),), config)
    assert isinstance(prepared, TinyDetector) and prepared is not model
    assert isinstance(prepared.backbone, torch.fx.GraphModule)
    qf.calibrate(prepared, _calibration())
    converted = qf.convert(prepared)
    images = _images(2, 9)
    raw, detections = converted(images)
    with torch.no_grad():
        assert torch.equal(raw, converted.head(converted.backbone(torch.stack(images))))
        float_raw, _ = model(images)
    # the float remainder computes exactly what it does on float inputs
    expected = TinyDetector.postprocess(raw)
    assert all(torch.equal(a, b) for a, b in zip(detections, expected))
    assert not torch.equal(raw, float_raw)  # the parts really are quantized
    sqnr = qf.qmath.sqnr_db(float_raw, raw)
    assert sqnr > 25
    assert model.backbone.__class__ is nn.Sequential  # the user's model is never modified
    for part in (converted.backbone, converted.head):  # every part converted, none left fake
        modules = list(part.modules())
        assert any(isinstance(module, IntegerLayer) for module in modules)
        assert not any(isinstance(module, (FakeQuantLayer, CalibrationQuantizer))
                       for module in modules)


def test_auto_finds_the_traceable_parts_and_says_what_stays_float(model):
    prepared = qf.prepare(model, (_images(1, 0),), qf.QuantConfig(quantize_only="auto",
                                                                   **CONFIG))
    parts = qf.parts_of(prepared)
    assert [name for name, text in parts.items() if text.startswith("quantized")] == [
        "backbone", "head"]
    assert "16x8x8" in parts["head"]


def test_a_part_exports_bit_exact_from_the_whole_models_inputs(model, tmp_path):
    config = qf.QuantConfig(quantize_only=("backbone", "head"), **CONFIG)
    prepared = qf.prepare(model, (_images(1, 0),), config)
    qf.calibrate(prepared, _calibration())
    converted = qf.convert(prepared)
    report = qf.export_onnx(converted, (_images(2, 5),), tmp_path / "backbone.onnx",
                            part="backbone", verify_data=[(_images(2, 6),)])
    assert report.fraction_identical == 1.0 and report.elements_compared == 2 * 2 * 16 * 8 * 8
    with pytest.raises(qf.ExportError, match="backbone, head"):
        qf.export_onnx(converted, (_images(1, 5),), tmp_path / "whole.onnx")
    with pytest.raises(qf.ExportError, match="part="):
        qf.export_onnx(converted, (_images(1, 5),), tmp_path / "x.onnx", part="neck")


def test_partial_qat_trains_and_converts_bit_exact(model):
    config = qf.QuantConfig(quantize_only=("backbone", "head"), **CONFIG)
    qat_model = qf.prepare_qat(model, (_images(2, 0),), config)
    assert qat_model.training
    optimizer = torch.optim.SGD(qat_model.parameters(), lr=1e-3)
    for seed in range(3):
        raw, _ = qat_model(_images(4, seed))
        raw.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    qf.end_qat_epoch(qat_model)
    qat_model.eval()
    images = _images(2, 7)
    with torch.no_grad():
        assert torch.equal(qat_model(images)[0], qf.convert(qat_model)(images)[0])


def test_qat_from_a_calibrated_partial_model(model):
    config = qf.QuantConfig(quantize_only=("backbone", "head"), **CONFIG)
    prepared = qf.prepare(model, (_images(1, 0),), config)
    qf.calibrate(prepared, _calibration())
    qat_model = qf.prepare_qat(prepared, (_images(1, 0),))
    assert isinstance(qat_model.head, torch.fx.GraphModule) and qat_model.training
    images = _images(2, 8)
    with torch.no_grad():  # QAT starts where calibration ended, in both parts
        calibrated = qf.convert(prepared)(images)[0]
        assert qf.qmath.sqnr_db(calibrated, qat_model.eval()(images)[0]) > 30


@pytest.mark.parametrize("names, message", [
    (("backbone", "neck"), "'neck', which is not a submodule"),
    (("backbone", "backbone.0"), "inside it"),
])
def test_bad_part_names_are_clear_errors(model, names, message):
    with pytest.raises(qf.PrepareError, match=message):
        qf.prepare(model, (_images(1, 0),), qf.QuantConfig(quantize_only=names, **CONFIG))


def test_a_part_with_list_inputs_is_refused_with_the_fix():
    class ListHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)])

        def forward(self, features):
            return [conv(f) for conv, f in zip(self.convs, features)]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = ListHead()

        def forward(self, x):
            outputs = self.head([x, x * 2])
            return outputs if x.mean() > -100 else outputs[::-1]  # data-dependent: no trace

    with pytest.raises(qf.PrepareError, match="name its submodules"):
        qf.prepare(Net(), torch.randn(1, 3, 8, 8), qf.QuantConfig(quantize_only=("head",),
                                                                  **CONFIG))
    prepared = qf.prepare(Net(), torch.randn(1, 3, 8, 8),
                          qf.QuantConfig(quantize_only="auto", **CONFIG))
    described = qf.parts_of(prepared)
    assert described["head"].startswith("float") and "not tensors" in described["head"]
    assert [n for n, t in described.items() if t.startswith("quantized")] == ["head.convs.0",
                                                                              "head.convs.1"]


def test_auto_quantizes_a_model_that_traces_whole_as_one():
    from tests.helpers import ConvBnReLU

    model, x = ConvBnReLU().eval(), torch.randn(4, 3, 8, 8)
    prepared = qf.prepare(model, x[:1], qf.QuantConfig(quantize_only="auto", **CONFIG))
    assert isinstance(prepared, torch.fx.GraphModule)
    whole = qf.prepare(model, x[:1], qf.QuantConfig(**CONFIG))
    qf.calibrate(prepared, [x])
    qf.calibrate(whole, [x])
    with torch.no_grad():  # the same as quantizing it whole
        assert torch.equal(qf.convert(prepared)(x), qf.convert(whole)(x))


def test_the_option_is_checked():
    with pytest.raises(qf.ConfigError, match="quantize_only"):
        qf.QuantConfig(quantize_only=[1, 2])
    with pytest.raises(qf.ConfigError, match="quantize_only"):
        qf.parts_of(nn.Linear(2, 2))


DETECTORS = [("ssdlite320_mobilenet_v3_large", 320), ("ssd300_vgg16", 300),
             ("retinanet_resnet50_fpn", 128), ("fcos_resnet50_fpn", 128),
             ("fasterrcnn_mobilenet_v3_large_fpn", 128), ("maskrcnn_resnet50_fpn", 128),
             ("keypointrcnn_resnet50_fpn", 128)]


@pytest.mark.slow
@pytest.mark.parametrize("name, size", DETECTORS)
def test_torchvision_detectors_quantize_in_parts_and_the_backbone_exports(name, size, tmp_path):
    import torchvision

    options = {} if name.startswith("ssd") else {"min_size": size, "max_size": size}
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                         **options).eval()
    images = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))
              for seed in range(3)]
    prepared = qf.prepare(model, ([images[0]],), qf.QuantConfig(quantize_only="auto",
                                                                **CONFIG))
    parts = [n for n, t in qf.parts_of(prepared).items() if t.startswith("quantized")]
    assert "backbone" in parts and len(parts) >= 3
    qf.calibrate(prepared, [([images[0]],), ([images[1]],)])
    converted = qf.convert(prepared)
    with torch.no_grad():
        detections = converted([images[2]])
    assert set(detections[0]) >= {"boxes", "scores", "labels"}
    report = qf.export_onnx(converted, ([images[2]],), tmp_path / "backbone.onnx",
                            part="backbone")
    assert report.fraction_identical == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_batch_is_refused_naming_the_tensor(model, bad):
    """The partial path runs the user's model as is: the observers refuse NaN/Inf (one NaN
    once set every exponent to -8 without a word)."""
    prepared = qf.prepare(model, (_images(1, 0),),
                          qf.QuantConfig(quantize_only=("backbone", "head"), **CONFIG))
    batches = _calibration()
    batches[1][0][2][0, 5, 5] = bad
    with pytest.raises(qf.NonFiniteError, match=r"tensor 'backbone\.\w+' holds NaN or inf"):
        qf.calibrate(prepared, batches)


def test_sixteen_bit_names_are_full_paths_across_parts(model):
    """Names resolved inside each part: "backbone.0" was refused with advice to use "0", which
    then widened head.0 too; "first" widened the first layer of every part."""
    def widths(names):
        config = qf.QuantConfig(quantize_only=("backbone", "head"), sixteen_bit_layers=names,
                                **CONFIG)
        prepared = qf.prepare(model, (_images(1, 0),), config)
        return {name for name, module in prepared.named_modules()
                if name.endswith("weight_quantizer") and module.bits == 16}

    assert widths(["backbone.0"]) == {"backbone.0.weight_quantizer"}
    assert widths(["first"]) == {"backbone.0.weight_quantizer"}
    assert widths(["last"]) == {"head.conv2d.weight_quantizer"}  # the part "head" is a conv
    with pytest.raises(qf.ConfigError, match="full module paths such as 'backbone.<layer>'"):
        widths(["0"])
