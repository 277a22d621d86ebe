"""calibrate ends by measuring the quantized model against float: no silent collapse."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import quantfx as qf
from quantfx.ptc.calibration_check import COLLAPSE_DB
from quantfx.state import state_of


def healthy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10)).eval()


def built_to_collapse() -> nn.Module:
    """A linear layer whose informative weights are tiny next to one weight that reads an input
    that is always zero: never-clipping per-tensor weights round every informative one to 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[0] = -1.0  # channel 0 of the ReLU output is always 0 on positive input
        model[0].bias[0] = -1.0
        model[2].weight.mul_(1e-3)
        model[2].weight[:, 0] = 50.0
        model[2].bias.zero_()
    return model


def calibrated(model: nn.Module, data: list[torch.Tensor], **options) -> nn.Module:
    prepared = qf.prepare(model, (data[0][:1],), qf.QuantConfig(progress=False, **options))
    qf.calibrate(prepared, data)
    return prepared


def test_check_is_kept_on_the_model_and_carried_to_the_export(tmp_path) -> None:
    data = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy model: no collapse warning
        prepared = calibrated(healthy(), data)
    check = state_of(prepared).calibration_check
    assert check.samples == 24 and check.output_sqnr_db > 25.0 and not check.collapsed
    assert check.worst_tensor is None
    converted = qf.convert(prepared)
    assert state_of(converted).calibration_check is check
    report = qf.export_onnx(converted, (data[0][:1],), str(tmp_path / "m.onnx"))
    assert report.calibration_sqnr_db == pytest.approx(check.output_sqnr_db)
    assert "calibration check" in report.summary()


def test_collapse_warns_and_names_the_tensor() -> None:
    data = [torch.rand(8, 16) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"collapsed.*loses most is '2'"):
        prepared = calibrated(built_to_collapse(), data, weight_observer="minmax",
                              bias_calibration=False)
    check = state_of(prepared).calibration_check
    assert check.collapsed and check.output_sqnr_db < COLLAPSE_DB
    assert check.worst_tensor == "2" and check.worst_loss_db > 10.0
