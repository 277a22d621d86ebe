"""BatchNorm after ReLU (Keras-style nets): its scale moves into the layer before the ReLU."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

import quantfx as qf
from quantfx.passes.batchnorm_scale import absorb_batchnorm_scales
from quantfx.qmath import sqnr_db


def keras_style(seed: int = 0) -> nn.Module:
    """Conv(valid) -> ReLU -> BN(eps 1e-3) blocks on raw 0..255 input, as a Keras CNN ported to
    PyTorch: BN statistics of trained nets, with one dead and one near-dead channel (its BN
    scale at the 1/sqrt(eps) ceiling, firing rarely), ReLU on the logits."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8, eps=1e-3),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8, eps=1e-3),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 7 * 7, 10), nn.ReLU())
    with torch.no_grad():
        model[0].weight[0] = -model[0].weight[0].abs()  # dead on non-negative input
        model[0].bias[0] = 0.0
        model[0].weight[1] = model[0].weight[1].abs() * 0.01  # fires on rare bright pixels
        model[0].bias[1] = -model[0].weight[1].sum() * 240
        model.train()
        for bn in (model[2], model[5]):
            bn.momentum = None
        for _ in range(4):
            model(torch.rand(64, 3, 16, 16) * 255)
        model[2].running_var[0] = 1e-12
        for bn in (model[2], model[5]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_absorbed_batchnorm_keeps_the_function_and_unit_scales() -> None:
    model = keras_style()
    traced = fx.symbolic_trace(model)
    data = torch.rand(8, 3, 16, 16) * 255
    before = model(data)
    assert absorb_batchnorm_scales(traced) == 2
    after = traced(data)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)
    for index in ("2", "5"):
        bn = traced.get_submodule(index)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        assert torch.allclose(scale.abs(), torch.ones_like(scale), atol=1e-5), index


def test_per_tensor_layers_keep_a_balanced_weight_grid() -> None:
    traced = fx.symbolic_trace(keras_style())
    absorb_batchnorm_scales(traced, per_channel=lambda layer: False)
    ranges = traced.get_submodule("0").weight.abs().flatten(1).amax(dim=1)
    live = ranges[ranges > 0]
    assert float(live.max() / live.median()) <= 2.0 + 1e-4


def test_keras_style_net_does_not_collapse_in_any_profile() -> None:
    model = keras_style()
    calibration = [torch.rand(16, 3, 16, 16) * 255 for _ in range(4)]
    test = torch.rand(64, 3, 16, 16) * 255
    reference = model(test)
    for target in ("generic", "tda4vm", "am68a"):
        prepared = qf.prepare(model, (calibration[0][:1],),
                              qf.QuantConfig(target=target, progress=False))
        qf.calibrate(prepared, calibration)
        assert sqnr_db(reference, qf.convert(prepared)(test)) > 25.0, target
