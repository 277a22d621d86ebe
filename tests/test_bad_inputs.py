"""Bad input at every public entry point: each is a `qf.QuantFxError` subclass that says what
is wrong and the fix, writes nothing, prints nothing and leaves the user's objects as they were.
Also the unusual-but-valid inputs that must simply work (reparametrized convs, forward
arguments with defaults, hooks, a single string where a list goes).
"""

from __future__ import annotations

import copy
import io
import math
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import quantfx as qf
from quantfx.export.onnx import options_path_for
from quantfx.layers import FakeQuantLayer
from quantfx.qmath import sqnr_db
from quantfx.state import InputRanks
from tests.helpers import ConvBnReLU, randomize_batchnorm

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (2, 3, 16, 16)


def config(**options) -> qf.QuantConfig:
    return qf.QuantConfig(progress=False, **options)


def batches(count: int = 3, shape=SHAPE, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(ConvBnReLU(), seed).eval()


def quantize(model: nn.Module, data: list[torch.Tensor], cfg: qf.QuantConfig | None = None):
    prepared = qf.prepare(model, (data[0],), cfg or config())
    qf.calibrate(prepared, data)
    return prepared, qf.convert(prepared)


@pytest.fixture(scope="module")
def converted_cnn():
    data = batches()
    _, converted = quantize(cnn(), data)
    return converted, data[0]


@pytest.fixture
def prepared_cnn():
    return qf.prepare(cnn(), (batches(1)[0],), config())


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, y):
        return self.conv_a(x) + self.conv_b(y)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `folder`."""
    return {str(path.relative_to(folder)): (path.read_bytes() if path.is_file() else None)
            for path in sorted(folder.rglob("*"))}


# ----------------------------------------------------------------------------------------------
# 1, 2: export destinations and file permissions


@pytest.mark.parametrize("kind, message", [
    ("existing folder", "is a folder"),
    ("trailing slash", "is a folder"),
    ("empty", "is a folder .or empty."),
    ("none", "path must be a file path"),
    ("missing folder", "does not exist"),
    ("json suffix", "must end with .onnx"),
])
def test_export_to_a_bad_path_writes_nothing(converted_cnn, tmp_path, monkeypatch, kind,
                                             message) -> None:
    converted, x = converted_cnn
    monkeypatch.chdir(tmp_path)  # "" and relative paths resolve here
    (tmp_path / "out.onnx").mkdir()
    (tmp_path / "sub").mkdir()
    path = {"existing folder": "out.onnx", "trailing slash": "sub/", "empty": "",
            "none": None, "missing folder": "missing/model.onnx",
            "json suffix": "model.json"}[kind]
    known = b'{"known": "content"}\n'
    if isinstance(path, str):
        beside = Path(options_path_for(path))  # where its .tidl.json would go
        if beside.parent.is_dir():
            beside.write_bytes(known)
    (tmp_path / "model.tidl.json").write_bytes(known)
    before = snapshot(tmp_path)
    with pytest.raises(qf.ExportError, match=message):
        qf.export_onnx(converted, (x,), path)
    assert snapshot(tmp_path) == before  # nothing new, nothing replaced
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)],
                         ids=["umask-022", "umask-077"])
def test_exported_files_get_open_permissions_under_the_umask(converted_cnn, tmp_path, umask,
                                                             mode) -> None:
    converted, x = converted_cnn
    previous = os.umask(umask)
    try:
        report = qf.export_onnx(converted, (x,), tmp_path / "model.onnx")
    finally:
        os.umask(previous)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.tidl.json"]
    for path in (report.path, report.options_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, path


# ----------------------------------------------------------------------------------------------
# 3, 12: option types


def _option_ids(case) -> str:
    """'threads=0' for an options dict; nothing for the expected message."""
    return ",".join(f"{k}={v!r}" for k, v in case.items()) if isinstance(case, dict) else "msg"


@pytest.mark.parametrize("options, message", [
    ({"nonnegative_inputs": "False"}, r"nonnegative_inputs='False' must be True or False"),
    ({"bias_calibration": "False"}, r"bias_calibration='False' must be True or False"),
    ({"per_channel_depthwise": 1}, r"per_channel_depthwise=1 must be True or False"),
    ({"bias_calibration": np.True_}, r"must be True or False \(a bool, not numpy\.bool"),
    ({"activation_bits": 8.0}, r"activation_bits=8\.0 is not supported.*an int"),
    ({"percentile": "99"}, r"percentile='99' must be a finite number"),
    ({"moving_average_momentum": float("nan")}, r"moving_average_momentum=nan must be a finite"),
    ({"activation_bitz": 8}, r"no option 'activation_bitz'.*Did you mean 'activation_bits'"),
], ids=_option_ids)
def test_bad_config_values_are_config_errors(options, message) -> None:
    with pytest.raises(qf.ConfigError, match=message):
        qf.QuantConfig(**options)


def test_misspelled_schedule_option_names_the_right_one() -> None:
    with pytest.raises(qf.ConfigError, match=r"'freeze_bn_stepp'.*Did you mean 'freeze_bn_step'"):
        qf.QATSchedule(freeze_bn_stepp=1)


@pytest.mark.parametrize("name", ["sixteen_bit_layers", "leaf_modules", "autowrap_functions"])
def test_none_is_an_empty_list(name) -> None:
    assert getattr(qf.QuantConfig(**{name: None}), name) == ()


@pytest.mark.parametrize("options, message", [
    ({"legacy": "no"}, r"legacy='no' must be True or False"),
    ({"verify": "yes"}, r"verify='yes' must be True or False"),
    ({"max_lsb_diff": "1"}, r"max_lsb_diff='1' must be a finite number"),
    ({"max_lsb_diff": -1}, r"max_lsb_diff=-1 must be a finite number in \[0.0, inf\)"),
    ({"threads": "2"}, r"threads='2' must be an integer >= 1"),
    ({"threads": 0}, r"threads=0 must be an integer >= 1"),
    ({"opset": 13.0}, r"opset=13\.0 must be an integer"),
], ids=_option_ids)
def test_bad_export_options_are_export_errors(converted_cnn, tmp_path, options, message) -> None:
    converted, x = converted_cnn
    with pytest.raises(qf.ExportError, match=message):
        qf.export_onnx(converted, (x,), tmp_path / "model.onnx", **options)
    assert os.listdir(tmp_path) == []


def score(model: nn.Module) -> float:
    with torch.no_grad():
        return float(model(batches(1, seed=5)[0]).mean())


def test_compare_bit_depths_rejects_a_string_tolerance() -> None:
    data = batches(2)
    with pytest.raises(qf.ConfigError, match=r"tolerance='1' must be a finite number"):
        qf.compare_bit_depths(cnn(), (data[0],), data, score, config(), tolerance="1")


def test_compare_bit_depths_rejects_an_evaluate_returning_a_string() -> None:
    data = batches(2)
    with pytest.raises(qf.ConfigError, match=r"evaluate returned 'top-1: 90%'.*finite number"):
        qf.compare_bit_depths(cnn(), (data[0],), data, lambda model: "top-1: 90%", config())


# ----------------------------------------------------------------------------------------------
# 4: compare_bit_depths leaves the user's model as it was


@pytest.mark.parametrize("training", [True, False])
def test_compare_bit_depths_keeps_the_models_mode(training) -> None:
    model = cnn().train(training)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    seen = []

    def evaluate(candidate: nn.Module) -> float:
        seen.append(candidate.training)
        return score(candidate)

    data = batches(2)
    report = qf.compare_bit_depths(model, (data[0],), data, evaluate, config())
    assert seen == [False, False, False]  # every model is scored in eval mode
    assert all(module.training is training for module in model.modules())
    after = model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in state.items())
    assert math.isfinite(report.int8_score) and math.isfinite(report.int16_score)


# ----------------------------------------------------------------------------------------------
# 5: user hooks stay with the user's model


def test_user_hooks_are_not_copied_into_the_quantized_model() -> None:
    model = cnn()
    calls: list[str] = []
    model.conv1.register_forward_hook(lambda module, inputs, output: calls.append("conv1"))
    model.register_forward_hook(lambda module, inputs, output: calls.append("root"))
    data = batches()
    with pytest.warns(UserWarning, match=r"hooks.*'conv1'"):
        prepared = qf.prepare(model, (data[0],), config())
    assert calls == []  # not during prepare's forward passes
    qf.calibrate(prepared, data)
    converted = qf.convert(prepared)
    with torch.no_grad():
        converted(data[0])
    assert calls == []  # not during calibration, not on the converted model
    for quantized in (prepared, converted):  # quantfx's own input check aside
        assert not any(module._forward_hooks or [
            hook for hook in module._forward_pre_hooks.values()
            if not isinstance(hook, InputRanks)] for module in quantized.modules())
    assert len(model.conv1._forward_hooks) == 1 and len(model._forward_hooks) == 1
    with torch.no_grad():
        model(data[0])
    assert calls == ["conv1", "root"]  # the user's model keeps its hooks


def test_model_with_an_output_scaling_hook_exports(tmp_path) -> None:
    model = cnn()
    model.register_forward_hook(lambda module, inputs, output: output * 2)
    data = batches()
    with pytest.warns(UserWarning, match="hooks"):
        _, converted = quantize(model, data)
    report = qf.export_onnx(converted, (data[0],), tmp_path / "model.onnx")
    assert report.verified and report.max_lsb_diff == 0


# ----------------------------------------------------------------------------------------------
# 6: a config is checked where it is used, and copied there


def test_config_field_changed_after_construction_is_checked_by_prepare() -> None:
    cfg = config()
    cfg.activation_bits = 4
    with pytest.raises(qf.ConfigError, match=r"activation_bits=4 is not supported"):
        qf.prepare(cnn(), (batches(1)[0],), cfg)


def _biases(prepared) -> list[torch.Tensor]:
    return [module.layer.bias.detach().clone() for module in prepared.modules()
            if isinstance(module, FakeQuantLayer)]


def test_changing_the_config_after_prepare_changes_nothing() -> None:
    data = batches()
    cfg = config()
    changed = qf.prepare(cnn(), (data[0],), cfg)
    cfg.bias_calibration = False  # too late: prepare works with its own copy
    cfg.activation_bits = 16
    qf.calibrate(changed, data)
    reference = qf.prepare(cnn(), (data[0],), config())
    qf.calibrate(reference, data)
    uncalibrated = qf.prepare(cnn(), (data[0],), config(bias_calibration=False))
    qf.calibrate(uncalibrated, data)
    got, expected, plain = _biases(changed), _biases(reference), _biases(uncalibrated)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not all(torch.equal(a, b) for a, b in zip(got, plain))  # the test has teeth
    with torch.no_grad():
        assert torch.equal(qf.convert(changed)(data[0]), qf.convert(reference)(data[0]))


# ----------------------------------------------------------------------------------------------
# 7, 16: leaf modules and trace errors


class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # untraceable: control flow on a tensor value
            return x
        return -x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_unknown_leaf_module_name_is_a_config_error() -> None:
    with pytest.raises(qf.ConfigError, match=r"leaf_modules names 'does\.not\.exist'"):
        qf.prepare(Gated(), (batches(1)[0],), config(leaf_modules=["does.not.exist"]))


def test_leaf_modules_as_a_single_string() -> None:
    data = batches()
    torch.manual_seed(0)
    model = Gated().eval()
    with pytest.raises(qf.TraceError, match="'gate'"):
        qf.prepare(model, (data[0],), config())
    assert config(leaf_modules="gate").leaf_modules == ("gate",)
    outputs = []
    for leaf in ("gate", ["gate"]):
        _, converted = quantize(model, data, config(leaf_modules=leaf))
        assert "gate" in [node.target for node in converted.graph.nodes
                          if node.op == "call_module"]
        with torch.no_grad():
            outputs.append(converted(data[0]))
    assert torch.equal(outputs[0], outputs[1])


class RootBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:  # untraceable, in the root's own forward
            x = -x
        return x


def test_trace_error_in_root_forward_does_not_suggest_the_root_as_leaf() -> None:
    with pytest.raises(qf.TraceError) as caught:
        qf.prepare(RootBranch(), (batches(1)[0],), config())
    message = str(caught.value)
    assert "leaf_modules=[" not in message
    assert "torch.fx.wrap" in message and "if x.sum() > 0" in message


# ----------------------------------------------------------------------------------------------
# 8, 9: example inputs


def test_zero_sized_batches_are_rejected(converted_cnn, prepared_cnn, tmp_path) -> None:
    empty = torch.randn(0, 3, 16, 16)
    with pytest.raises(qf.PrepareError, match="at least one sample"):
        qf.prepare(cnn(), (empty,), config())
    with pytest.raises(qf.CalibrationError, match="at least one sample"):
        qf.calibrate(prepared_cnn, [empty])
    converted, _ = converted_cnn
    with pytest.raises(qf.ExportError, match="at least one sample"):
        qf.export_onnx(converted, (empty,), tmp_path / "model.onnx")
    assert os.listdir(tmp_path) == []


def test_wrong_channel_count_gives_torchs_reason_in_one_line(capsys) -> None:
    with pytest.raises(qf.PrepareError) as caught:
        qf.prepare(cnn(), (torch.randn(2, 5, 16, 16),), config())
    lines = str(caught.value).splitlines()
    reason = [line for line in lines if re.search("channels|expected input", line)]
    assert len(reason) == 1 and "conv1" in reason[0], lines
    assert len(lines) <= 3 and "Traceback" not in str(caught.value)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_example_inputs_of_another_float_dtype(dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(qf.PrepareError, match=rf"is {name} .* parameters are float32"):
        qf.prepare(cnn(), (torch.randn(SHAPE).to(dtype),), config())


def test_one_example_input_for_a_two_input_model() -> None:
    with pytest.raises(qf.PrepareError, match=r"holds 1 tensor\(s\) but .* takes 2"):
        qf.prepare(TwoInputs(), (torch.randn(SHAPE),), config())


# ----------------------------------------------------------------------------------------------
# 10, 17: calibration data


x16 = torch.randn(SHAPE)


@pytest.mark.parametrize("two_inputs, batch, message", [
    (False, x16.double(), r"is float64 .* parameters are float32"),
    (False, (x16 * 50).clamp(0, 255).to(torch.uint8), r"is uint8 .* float tensors"),
    (False, torch.zeros(SHAPE, dtype=torch.int64), r"is int64 .* float tensors.*quantize_only"),
    (False, torch.randn(3, 16, 16), r"rank-4"),
    (True, x16, r"holds 1 tensor\(s\) but the model was prepared with 2"),
    (True, (x16, torch.randn(1, 3, 16, 16)), r"mixes batch sizes \[1, 2\]"),
    (False, torch.randn(2, 5, 16, 16), r"fails on calibration batch 0.*(channels|expected input)"),
], ids=["float64", "uint8", "int64", "rank", "one-of-two", "batch-sizes", "channels"])
def test_mismatched_calibration_data(two_inputs, batch, message) -> None:
    model = TwoInputs() if two_inputs else cnn()
    example = (x16, x16) if two_inputs else (x16,)
    prepared = qf.prepare(model, example, config())
    with pytest.raises(qf.CalibrationError, match=message):
        qf.calibrate(prepared, [batch])


@pytest.mark.parametrize("data, num_batches, message", [
    ([x16], True, r"num_batches=True must be an integer >= 1"),
    ([x16], 0, r"num_batches=0 must be an integer >= 1"),
    ("abc", None, r"iterable of batches .* got str"),
    ({"x": x16}, None, r"iterable of batches .* got dict"),
], ids=["num_batches-True", "num_batches-0", "str", "dict"])
def test_bad_calibration_arguments(prepared_cnn, data, num_batches, message) -> None:
    with pytest.raises(qf.CalibrationError, match=message):
        qf.calibrate(prepared_cnn, data, num_batches=num_batches)


# ----------------------------------------------------------------------------------------------
# 11: weight_norm / spectral_norm


class Reparametrized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.relu(self.conv(x)))


REPARAMETRIZATIONS = {
    "weight_norm": lambda conv: torch.nn.utils.weight_norm(conv),
    "parametrizations.weight_norm": torch.nn.utils.parametrizations.weight_norm,
    "spectral_norm": lambda conv: torch.nn.utils.spectral_norm(conv),
    "parametrizations.spectral_norm": torch.nn.utils.parametrizations.spectral_norm,
}


def _reparametrized(name: str, data: list[torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    model = Reparametrized()
    model.conv = REPARAMETRIZATIONS[name](model.conv)
    model(data[0])  # one training step's forward (spectral norm's power iteration runs)
    return model.eval()  # straight from training: its computed weight is part of autograd


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
@pytest.mark.parametrize("name", list(REPARAMETRIZATIONS))
def test_reparametrized_conv_quantizes_and_exports(name, tmp_path) -> None:
    data = batches()
    model = _reparametrized(name, data)
    reference = model(data[0]).detach()  # the float eval output
    _, converted = quantize(model, data)
    with torch.no_grad():
        assert sqnr_db(reference, converted(data[0])) > 25
    report = qf.export_onnx(converted, (data[0],), tmp_path / "model.onnx")
    assert report.verified and report.max_lsb_diff == 0


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
@pytest.mark.parametrize("name", list(REPARAMETRIZATIONS))
def test_prepare_leaves_a_reparametrized_model_working(name) -> None:
    data = batches()
    model = _reparametrized(name, data)
    reference = model(data[0]).detach()
    qf.prepare(model, (data[0],), config())
    assert torch.equal(model(data[0]).detach(), reference)  # "your model is never modified"


# ----------------------------------------------------------------------------------------------
# 13: forward arguments with defaults


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, scale: float = 2.0):
        return self.conv(x) * scale


class OptionalSecond(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, y=None):
        if y is not None:
            x = x + y
        return self.conv(x)


@pytest.mark.parametrize("model_class", [Scaled, OptionalSecond])
def test_forward_arguments_with_defaults(model_class, tmp_path) -> None:
    torch.manual_seed(0)
    model = model_class().eval()
    data = batches()
    if model_class is OptionalSecond:  # y's branch is traced away: said at prepare
        with pytest.warns(qf.QuantFxWarning, match="traced with y at its default None"):
            _, converted = quantize(model, data)
    else:
        _, converted = quantize(model, data)
    with torch.no_grad():
        assert sqnr_db(model(data[0]), converted(data[0])) > 25
    report = qf.export_onnx(converted, (data[0],), tmp_path / "model.onnx")
    assert report.verified and report.max_lsb_diff == 0


def _reloaded(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_an_argument_traced_at_its_default_takes_that_value_only() -> None:
    """Another value for an argument traced at its default was a bare AssertionError from
    torch.fx (positional) or a TypeError (by name: fx renames it `y_1`); the default given by
    name was refused too; and torch.load of a second such model failed (KeyError in fx)."""
    data = batches()
    with pytest.warns(qf.QuantFxWarning, match="traced with y at its default None"):
        prepared, converted = quantize(OptionalSecond().eval(), data)
    models = [prepared, converted, _reloaded(prepared), _reloaded(converted),
              copy.deepcopy(converted)]
    for model in models:
        expected = model(data[0])
        torch.testing.assert_close(model(data[0], y=None), expected, rtol=0, atol=0)
        torch.testing.assert_close(model(data[0], None), expected, rtol=0, atol=0)
        for arguments, keywords in (((data[0],), {}), ((), {"y": data[0]})):
            with pytest.raises(qf.InputError, match=r"prepared with y=None .* got y = Tensor"):
                model(data[0], *arguments, **keywords)
    with pytest.raises(qf.InputError, match="prepared with scale=2.0"):
        quantize(Scaled().eval(), data)[0](data[0], scale=3.0)


# ----------------------------------------------------------------------------------------------
# 14: the command line


def _quantfx(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantfx", *arguments], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_help_exits_zero() -> None:
    result = _quantfx("--help")
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "Traceback" not in result.stderr


def test_cli_bad_batch_size_is_a_usage_error() -> None:
    result = _quantfx("demo", "--batch-size", "0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--batch-size" in errors[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]


# ----------------------------------------------------------------------------------------------
# 15: verification data and the converted model's inputs


def test_verify_data_of_dicts_is_an_export_error(converted_cnn, tmp_path) -> None:
    converted, x = converted_cnn
    with pytest.raises(qf.ExportError, match=r"verify_data batch 0 is a dict"):
        qf.export_onnx(converted, (x,), tmp_path / "model.onnx", verify_data=[{"image": x}])
    assert os.listdir(tmp_path) == []


def test_empty_or_non_finite_verify_data_is_an_export_error(converted_cnn, tmp_path) -> None:
    """verify_data=[] verified only the example inputs and NaN batches were "100 %
    bit-identical", both reported as verified: export refuses them before writing a file."""
    converted, x = converted_cnn
    with pytest.raises(qf.ExportError, match=r"verify_data holds no batch"):
        qf.export_onnx(converted, (x,), tmp_path / "model.onnx", verify_data=[])
    with pytest.raises(qf.ExportError, match=r"verify_data batch 0 holds NaN or Inf"):
        qf.export_onnx(converted, (x,), tmp_path / "model.onnx",
                       verify_data=torch.full_like(x, float("nan")))
    with pytest.raises(qf.ExportError, match=r"example input 0 holds NaN or Inf"):
        qf.export_onnx(converted, torch.full_like(x, float("inf")), tmp_path / "model.onnx")
    assert os.listdir(tmp_path) == []


def test_converted_model_rejects_integer_images(converted_cnn) -> None:
    converted, x = converted_cnn
    images = (x * 50).clamp(0, 255).to(torch.uint8)
    with pytest.raises(qf.InputError, match=r"uint8.*float"):
        converted(images)


def test_an_image_without_its_batch_dimension_is_refused_by_rank(converted_cnn) -> None:
    """The float model refuses an unbatched image (or fails in its Linear); the converted one
    ran it through its convs into a wrong shape, or failed deep inside torch."""
    converted, x = converted_cnn
    with pytest.raises(qf.InputError, match=r"has 4 dimensions .* got float32 \(3, .*"
                                            r"x\.unsqueeze\(0\)"):
        converted(x[0])
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(converted), torch.load(buffer, weights_only=False)):
        with pytest.raises(qf.InputError, match="has 4 dimensions"):
            copied(x[0])
    assert converted(x).shape[0] == x.shape[0]
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    prepared = qf.prepare(mlp, torch.randn(1, 16), qf.QuantConfig(progress=False))
    tokens = torch.randn(2, 5, 16)  # more dimensions: per token, as the float model runs it
    converted_mlp = qf.convert(qf.calibrate(prepared, [torch.randn(8, 16)]))
    assert torch.equal(converted_mlp(tokens), converted_mlp(tokens.reshape(10, 16)).reshape(
        2, 5, 4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_float_of_another_dtype_is_refused_before_any_range_is_recorded(dtype) -> None:
    """A float64 batch in the user's own calibration loop: an InputError, and the input's
    range stays what the float32 batches make it (it was recorded, 128x too wide, before
    the conv failed with a bare torch error)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    prepared = qf.prepare(model, torch.randn(1, 3, 16, 16), qf.QuantConfig(progress=False))
    batches = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    reference = copy.deepcopy(prepared)
    with torch.no_grad():
        with pytest.raises(qf.InputError, match=r"float32 got .*give x.to\(torch.float32\)"):
            prepared(torch.randn(8, 3, 16, 16, dtype=dtype) * 100)
        for batch in batches:
            prepared(batch)
            reference(batch)
    converted, expected = qf.convert(prepared), qf.convert(reference)
    assert torch.equal(converted(batches[0]), expected(batches[0]))
    with pytest.raises(qf.InputError, match=r"float32 got"):
        converted(batches[0].to(dtype))
