"""Models written the way users write them: in-place ops, functional convs, *args and
keyword-only forwards, namedtuple outputs, elementwise math, and the workflow slips that
should be clear errors (float64 models, inference mode, a failed calibration, early freezes)."""

from __future__ import annotations

import collections
import os
import stat
import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantfx as qf
from quantfx.layers import IntegerLayer
from tests.helpers import ConvBnReLU

CONFIG = qf.QuantConfig(progress=False)
X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _convert(model: nn.Module, inputs: torch.Tensor = X) -> nn.Module:
    prepared = qf.prepare(model.eval(), inputs[:1], CONFIG)
    qf.calibrate(prepared, [inputs])
    return qf.convert(prepared)


def _export(converted: nn.Module, tmp_path, inputs: torch.Tensor = X) -> qf.ExportReport:
    return qf.export_onnx(converted, inputs[:2], tmp_path / "model.onnx", verify_data=inputs)


class InPlace(nn.Module):
    """Mutations whose results are not reassigned: y.relu_(), z += 1, z.mul_(2), an in-place
    ReLU module and F.relu(inplace=True) called for their side effect only."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.second = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.first(x)
        y.relu_()
        z = self.second(y)
        z += 1
        z.mul_(2)
        alias = z
        self.relu(alias)
        F.relu(y, inplace=True)
        return self.second(alias) + y


def test_in_place_ops_keep_their_effect():
    model = InPlace().eval()
    prepared = qf.prepare(model, X[:1], CONFIG)
    with torch.no_grad():
        assert torch.equal(prepared(X), model(X))  # observing only: the float function
    qf.calibrate(prepared, [X])
    with torch.no_grad():
        assert qf.qmath.sqnr_db(model(X), qf.convert(prepared)(X)) > 25


class FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(4) * 0.1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.weight, self.bias, padding=1))
        return F.linear(y.mean((2, 3)), self.head.weight, self.head.bias)


@pytest.mark.parametrize("model", [FunctionalConv(), nn.Conv2d(3, 4, 3), nn.Linear(8, 3)],
                         ids=["functional", "bare-conv", "bare-linear"])
def test_functional_and_bare_layers_get_integer_weights(model, tmp_path):
    inputs = X if not isinstance(model, nn.Linear) else torch.randn(4, 8)
    converted = _convert(model, inputs)
    kinds = [type(module).__name__ for module in converted.modules()]
    assert "IntegerLayer" in kinds
    assert not any(node.target in (F.conv2d, F.linear) for node in converted.graph.nodes)
    with torch.no_grad():
        assert qf.qmath.sqnr_db(model(inputs), converted(inputs)) > 25
    assert _export(converted, tmp_path, inputs).max_lsb_diff == 0


NT = collections.namedtuple("NT", "features pooled")


class StarInputs(nn.Module):
    """forward(*inputs) returning a namedtuple."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, *inputs):
        y = self.conv(inputs[0])
        return NT(y, y.mean((2, 3)))


class KeywordOnly(StarInputs):
    def forward(self, x, *, scale=2.0):
        return self.conv(x) * scale


@pytest.mark.parametrize("model, outputs", [(StarInputs(), 2), (KeywordOnly(), 1)],
                         ids=["star-inputs-namedtuple", "keyword-only-default"])
def test_forward_signatures_export(model, outputs, tmp_path):
    report = _export(_convert(model), tmp_path)
    assert report.max_lsb_diff == 0 and len(report.output_scales) == outputs


class Elementwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        a = y / 3 + (-y) + y.abs() + torch.clamp(y, -0.5, 0.7)
        b = torch.maximum(y, a) + torch.minimum(y, 2 * a) + y ** 2 + a.pow(3)
        return self.head(a + b + torch.sqrt(y.abs() + 1))


def test_elementwise_math_exports_bit_exact(tmp_path):
    assert _export(_convert(Elementwise()), tmp_path).max_lsb_diff == 0


def test_an_op_export_cannot_write_is_announced_at_prepare():
    class Cumulative(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.cumsum(self.conv(x), dim=1)

    with pytest.warns(UserWarning, match="no ONNX emitter for: cumsum"):
        qf.prepare(Cumulative(), X[:1], CONFIG)

    class Recurrent(nn.Module):  # a module with several outputs (output, (h, c))
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qf.prepare(Recurrent(), torch.randn(1, 5, 8), CONFIG)
    assert any("no ONNX emitter for: LSTM" in str(w.message) and "quantize_only"
               in str(w.message) for w in caught)


def test_qat_warns_when_forward_depends_on_training():
    class TrainingOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return (y, y.mean()) if self.training else y

    with pytest.warns(UserWarning, match="depends on self.training"):
        qf.prepare_qat(TrainingOutputs(), X[:1], CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qf.prepare_qat(ConvBnReLU(), X[:1], CONFIG)  # no false alarm


def test_a_submodule_named_like_the_qat_controller_is_kept():
    class Clash(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qat_controller = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.qat_controller(x)

    model = Clash().eval()
    qat = qf.prepare_qat(model, X[:1], CONFIG)
    qat(X)
    qf.end_qat_epoch(qat)
    converted = qf.convert(qat.eval())
    layer = converted.get_submodule("qat_controller")  # the user's conv, quantized
    assert isinstance(layer, IntegerLayer) and layer.weight_int.shape == (4, 3, 3, 3)
    with torch.no_grad():
        assert qf.qmath.sqnr_db(model(X), converted(X)) > 25


def test_workflow_slips_are_clear_errors():
    with pytest.raises(qf.PrepareError, match="float32 models"):
        qf.prepare(ConvBnReLU().double(), X[:1].double(), CONFIG)
    with torch.inference_mode(), pytest.raises(qf.PrepareError, match="inference_mode"):
        qf.prepare(ConvBnReLU(), X[:1], CONFIG)
    schedule = qf.QuantConfig(progress=False, qat_schedule=qf.QATSchedule(freeze_ranges_step=0))
    with pytest.raises(qf.ConfigError, match="before they saw any data"):
        qf.prepare_qat(ConvBnReLU(), X[:1], schedule)
    with pytest.raises(qf.PrepareError, match="got str"):
        qf.prepare_qat(qf.prepare(ConvBnReLU(), X[:1], CONFIG), "garbage")
    # moved off float32 after prepare / convert: refused before any work, not deep in torch
    with pytest.raises(qf.CalibrationError, match="float32 models.*float64"):
        qf.calibrate(qf.prepare(ConvBnReLU(), X[:1], CONFIG).double(), [X.double()])
    converted = qf.convert(qf.calibrate(qf.prepare(ConvBnReLU(), X[:1], CONFIG), [X]))
    with pytest.raises(qf.ConvertError, match="integer-exact in float32.*float16"):
        converted.half()(X.half())
    assert torch.equal(converted.double()(X.double()).float(), converted.float()(X))
    with pytest.raises(qf.ConfigError, match="got a model already converted by quantfx"):
        qf.end_qat_epoch(converted)
    qat = qf.prepare_qat(ConvBnReLU(), X[:1], CONFIG)
    with pytest.raises(qf.ExportError, match=r"quantfx.convert\(qat_model\)"):
        qf.export_onnx(qat, X[:1], "unused.onnx")
    with pytest.raises(qf.PrepareError, match="differ from those the model was prepared"):
        qf.prepare_qat(qf.prepare(ConvBnReLU(), X[:1], CONFIG), X[:1, :, :-2])  # were ignored
    assert qf.prepare_qat(qf.prepare(ConvBnReLU(), X[:1], CONFIG), X[:2]) is not None  # batch
    wrapped = nn.DataParallel(qf.prepare(ConvBnReLU(), X[:1], CONFIG))  # as DDP wraps it
    assert qf.calibrate(wrapped, [X]) is wrapped.module


def test_convert_refuses_a_model_whose_calibration_failed():
    prepared = qf.prepare(ConvBnReLU(), X[:1], CONFIG)
    broken = X.clone()
    broken[0, 0, 0, 0] = float("nan")
    with pytest.raises(qf.CalibrationError, match="batch 1 holds NaN"):
        qf.calibrate(prepared, [X, broken])
    with pytest.raises(qf.ConvertError, match="calibrate call .* stopped"):
        qf.convert(prepared)
    qf.calibrate(prepared, [X])
    qf.convert(prepared)


def test_bias_calibration_samples_limit_a_single_large_batch():
    def biases(samples: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        config = qf.QuantConfig(progress=False, bias_calibration_samples=samples)
        prepared = qf.prepare(ConvBnReLU(), X[:1], config)
        qf.calibrate(prepared, [torch.randn(16, 3, 8, 8, generator=torch.Generator()
                                            .manual_seed(1))])
        return [p.detach().clone() for n, p in prepared.named_parameters() if n.endswith("bias")]

    assert any(not torch.equal(a, b) for a, b in zip(biases(2), biases(16)))


def test_converted_model_ignores_autocast_and_wrappers_are_unwrapped():
    prepared = qf.prepare(ConvBnReLU(), X[:1], CONFIG)
    qf.calibrate(prepared, [X])
    converted = qf.convert(torch.optim.swa_utils.AveragedModel(prepared))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(converted(X), qf.convert(prepared)(X))


def test_export_writes_through_a_symlink_and_keeps_an_existing_files_mode(tmp_path):
    converted = _convert(ConvBnReLU())
    target = tmp_path / "real.onnx"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    qf.export_onnx(converted, X[:1], link)
    assert link.is_symlink() and onnx.load(str(target)).graph.node
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640


class ReadsItsOwnWeights(nn.Module):
    """Code that reads layers' parameters itself: a conv's weight shape, and a Linear whose
    weight is tied into a second, functional use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        pooled = y.view(y.shape[0], self.conv.weight.shape[0], -1).mean(-1)
        return pooled + F.linear(F.relu(self.proj(pooled)), self.proj.weight.t())


def test_forward_may_read_the_weights_of_layers_quantfx_wraps():
    torch.manual_seed(0)
    model, images = ReadsItsOwnWeights().eval(), torch.randn(8, 3, 8, 8)
    with pytest.warns(qf.QuantFxWarning, match="linear"):  # the functional, float-weight use
        prepared = qf.prepare(model, (images[:1],), qf.QuantConfig(progress=False))
    with pytest.warns(qf.QuantFxWarning, match="linear"):
        qat = qf.prepare_qat(model, (images[:1],), qf.QuantConfig(progress=False))
    with torch.no_grad():
        torch.testing.assert_close(prepared(images), model(images))
        torch.testing.assert_close(qat.eval()(images), model(images), atol=0.1, rtol=0.1)
    qf.calibrate(prepared, [images])
    assert qf.convert(prepared)(images).shape == (8, 8)
