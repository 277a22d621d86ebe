"""Errors and warnings by cause: every warning quantfx gives is a `QuantFxWarning` pointing at
the user's line; a quantfx bug is an `InternalError`, not a user error."""

import warnings

import pytest
import torch
from torch import nn

import quantfx as qf
from quantfx.errors import warn
from tests.helpers import ConvBnReLU


class _Hooked(ConvBnReLU):
    """A forward hook: quantfx warns that the quantized model drops it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1.register_forward_hook(lambda module, args, output: None)


def test_a_warning_has_quantfx_category_and_names_the_users_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qf.prepare(_Hooked(), torch.randn(1, 3, 8, 8), qf.QuantConfig(progress=False))
    ours = [w for w in caught if issubclass(w.category, qf.QuantFxWarning)]
    assert ours and "hooks" in str(ours[0].message)
    assert ours[0].filename == __file__  # this line, not a line deep inside quantfx or torch
    assert not [w for w in caught if w.category is UserWarning and "quantfx" in str(w.message)]


def test_quantfx_warnings_can_be_silenced_by_category_alone():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=qf.QuantFxWarning)
        qf.prepare(_Hooked(), torch.randn(1, 3, 8, 8), qf.QuantConfig(progress=False))


def test_warn_points_at_the_first_frame_outside_the_package():
    def user_code():
        warn("from inside")  # called from here: a test file counts as the user

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        user_code()
    assert caught[0].filename == __file__ and caught[0].category is qf.QuantFxWarning


def test_an_internal_error_is_a_quantfx_error_that_asks_for_a_report(monkeypatch, tmp_path):
    import onnx

    def invalid(model, full_check=False):  # an emitter that wrote a broken graph
        raise onnx.checker.ValidationError("Nodes in a graph must be topologically sorted")

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    prepared = qf.prepare(model, torch.randn(1, 3, 8, 8), qf.QuantConfig(progress=False))
    qf.calibrate(prepared, [torch.randn(4, 3, 8, 8)])
    converted = qf.convert(prepared)
    monkeypatch.setattr(onnx.checker, "check_model", invalid)
    with pytest.raises(qf.InternalError, match="(?s)ONNX graph is invalid.*quantfx bug: "
                                               "please report") as raised:
        qf.export_onnx(converted, torch.randn(1, 3, 8, 8), tmp_path / "never.onnx")
    assert isinstance(raised.value, qf.QuantFxError) and not list(tmp_path.iterdir())
