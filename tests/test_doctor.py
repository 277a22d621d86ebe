"""doctor: each finding on a model (and optimizer) built to have it; nothing on a clean one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantfx as qf
from benchmarks.models import regnetx_style, resnet_style
from tests.helpers import randomize_batchnorm

X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _sgd(model: nn.Module, decay: float = 1e-4) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=decay)


@pytest.mark.parametrize("build", [resnet_style, regnetx_style])
def test_a_clean_model_and_optimizer_get_no_finding(build):
    model = randomize_batchnorm(build()).eval()
    report = qf.doctor(model, torch.randn(1, 1, 28, 28), _sgd(model))
    assert report.findings == [] and report.ok, str(report)
    assert "nothing to fix" in str(report)


def test_a_16_bit_config_is_checked_at_the_opset_its_export_would_use():
    model = randomize_batchnorm(resnet_style()).eval()
    config = qf.QuantConfig(activation_bits=16, weight_bits=16, progress=False)
    report = qf.doctor(model, torch.randn(1, 1, 28, 28), _sgd(model), config=config)
    assert report.findings == [], str(report)


class Planted(nn.Module):
    """One of each problem a guide warns about (the comments say which)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # no BatchNorm after it
        self.relu = nn.ReLU()  # called at two sites
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)  # after a ReLU: folds forward into the 1x1 project only
        self.project = nn.Conv2d(8, 8, 1)
        self.project_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.conv.weight[0].mul_(200.0)  # one outlier output channel

    def forward(self, x):
        x = self.relu(self.conv(x))
        x = self.bn(self.relu(self.depthwise(x)))
        x = F.relu(self.project_bn(self.project(x)))  # a functional
        return self.head(torch.cumsum(x, 1).mean((2, 3)))  # cumsum: no ONNX emitter


@pytest.fixture(scope="module")
def planted_report() -> qf.DoctorReport:
    model = Planted().eval()
    decay = [p for n, p in model.named_parameters() if n in ("conv.weight", "project.weight")]
    rest = [p for n, p in model.named_parameters() if n not in ("conv.weight", "project.weight")]
    optimizer = torch.optim.Adam([{"params": decay, "weight_decay": 1e-4},
                                  {"params": rest, "weight_decay": 0.0}])
    return qf.doctor(model, X, optimizer, qf.QuantConfig(target="tda4vm"))


@pytest.mark.parametrize("severity, where, what", [
    ("warning", "conv", "without BatchNorm"),
    ("info", "bn", "does not follow a conv"),
    ("warning", "optimizer param group 1", "weight decay 0"),
    ("info", "Adam", "other than SGD"),
    ("info", "relu", "called at 2 sites"),  # one finding for all reused modules
    ("info", "forward", "functionals: mean, relu"),
    ("info", "depthwise conv(s)", "depthwise"),
    ("warning", "conv", "weight range is"),
    ("warning", "cumsum", "no ONNX emitter"),
])
def test_each_planted_problem_is_found(planted_report, severity, where, what):
    assert any(f.severity == severity and where in f.where and what in f.what
               for f in planted_report.findings), str(planted_report)
    assert not planted_report.ok


def test_weight_decay_finding_names_biases_batchnorm_and_depthwise(planted_report):
    finding = next(f for f in planted_report.findings if "weight decay" in f.what)
    assert "(bias)" in finding.what and "(BatchNorm)" in finding.what
    assert "depthwise" in finding.what and "1e-4" in finding.fix


def test_depthwise_finding_says_whether_per_channel_is_on(planted_report):
    finding = next(f for f in planted_report.findings if f.what == "depthwise convolutions")
    assert "per tensor" in finding.why  # tda4vm


def test_untraceable_code_is_an_error_with_the_fix():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y if y.sum() > 0 else -y

    report = qf.doctor(Untraceable(), X)
    assert report.findings[0].severity == "error" and "torch.fx.wrap" in report.findings[0].fix


def test_an_op_tidl_runs_on_arm_is_a_warning():
    class Channels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.softmax(self.bn(self.conv(x)), dim=1)  # TIDL: softmax on W or H

    report = qf.doctor(Channels().eval(), X, config=qf.QuantConfig(target="am68a"))
    assert any("ARM cores of am68a" in f.what and "softmax" in f.what for f in report.findings)


def test_an_activation_with_a_long_tail_is_found_and_a_bounded_one_is_not():
    class Spiky(nn.Module):
        def __init__(self, activation: nn.Module) -> None:
            super().__init__()
            self.conv, self.bn, self.activation = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), activation
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(self.activation(self.bn(self.conv(x))))

    spiked = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    spiked[0, :, 5, 5] = 400.0  # one pixel: 0.2 % of the values, 100x the rest
    found = [f for f in qf.doctor(Spiky(nn.ReLU()).eval(), spiked).findings
             if "without a bound" in f.what]
    assert found and found[0].where == "activation" and "ReLU6" in found[0].fix
    bounded = qf.doctor(Spiky(nn.ReLU6()).eval(), spiked).findings
    assert not [f for f in bounded if "without a bound" in f.what and f.where == "activation"]


def test_report_formats_and_bad_arguments(planted_report):
    assert json.loads(planted_report.to_json())["ok"] is False
    assert planted_report.to_markdown().count("\n|") >= len(planted_report.findings)
    with pytest.raises(qf.ConfigError, match="optimizer"):
        qf.doctor(Planted(), X, optimizer="sgd")
    with pytest.raises(qf.ConfigError, match="torch.nn.Module"):
        qf.doctor("model", X)
    qat = qf.prepare_qat(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), X,
                         qf.QuantConfig(progress=False))
    with pytest.raises(qf.ConfigError, match="doctor needs the float model.*prepare_qat"):
        qf.doctor(qat, X)  # it reported "the model does not trace"
    wrong = qf.doctor(nn.Sequential(nn.Conv2d(1, 4, 3)), X)  # 3-channel input, 1-channel conv
    assert wrong.findings[0].fix.startswith("pass example_inputs")  # not "Fix: pass ..."


def test_an_optimizer_of_another_model_is_an_error():
    """docs once passed the QAT model's optimizer with the float model: 'nothing to fix'."""
    model = randomize_batchnorm(resnet_style()).eval()
    other = _sgd(resnet_style())
    report = qf.doctor(model, torch.randn(1, 1, 28, 28), other)
    assert not report.ok
    assert [(f.severity, f.what) for f in report.findings] == [
        ("error", f"the optimizer holds none of the model's "
                  f"{len(list(model.parameters()))} parameters")]


def test_an_optimizer_holding_part_of_the_model_is_a_warning_unless_the_rest_is_frozen():
    model = randomize_batchnorm(resnet_style()).eval()
    head = list(model.parameters())[-2:]
    partial = torch.optim.SGD(head, lr=0.1, momentum=0.9, weight_decay=1e-4)
    found = [f for f in qf.doctor(model, torch.randn(1, 1, 28, 28), partial).findings
             if "the optimizer holds" in f.what]
    count = len(list(model.parameters()))
    assert [(f.severity, f.what.split(";")[0]) for f in found] == [
        ("warning", f"the optimizer holds 2 of the model's {count} parameters")]
    for parameter in list(model.parameters())[:-2]:
        parameter.requires_grad_(False)  # frozen on purpose: nothing to say
    assert not [f for f in qf.doctor(model, torch.randn(1, 1, 28, 28), partial).findings
                if "the optimizer holds" in f.what]


def test_a_standalone_batchnorm_reports_its_per_tensor_cost():
    """BatchNorm after a ReLU and before a padded conv folds neither way: TIDL runs it with one
    per-tensor weight scale. Channel scales 0.01..4 under 2**-4: five channels keep fewer than 8
    codes (three round to 0)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 4, 3, padding=1)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([4.0, 1.0, 0.5, 0.25, 0.1, 0.03, 0.02, 0.01]))
        model[2].running_var.fill_(1.0 - model[2].eps)
    found = [f for f in qf.doctor(model, X, config=qf.QuantConfig(target="tda4vm")).findings
             if f.where == "2"]
    assert [f.severity for f in found] == ["warning"], found
    assert "8 channel scales span 0.01..4" in found[0].why
    assert "5 channel(s) with fewer than 8 codes" in found[0].why, found[0].why


def test_a_partly_quantized_model_is_checked_in_its_parts():
    """quantize_only: doctor checks each part on the arguments it receives (it traced the whole
    model and reported an untraceable-code error that prepare with this config never hits),
    its findings named by module path; "auto" finds the same part."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(8, 4, 1))

        def forward(self, x):
            y = self.backbone(x)
            return y * 2 if y.sum() > 0 else y

    inputs = torch.randn(1, 3, 16, 16)
    assert any(f.where == "trace" for f in qf.doctor(Branchy().eval(), inputs).findings)
    for parts in (("backbone",), "auto"):
        config = qf.QuantConfig(quantize_only=parts, progress=False)
        report = qf.doctor(Branchy().eval(), inputs, config=config)
        assert [(f.severity, f.where) for f in report.findings] == [("warning", "backbone.0")]
        assert "without BatchNorm" in report.findings[0].what
    config = qf.QuantConfig(quantize_only=("backbone.1",), progress=False)
    report = qf.doctor(Branchy().eval(), inputs, config=config)
    assert report.findings[0].where == "parts" and not report.ok
