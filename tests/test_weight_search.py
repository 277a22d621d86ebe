"""Weight exponents chosen by the layer's output error (`quantfx.ptc.weight_search`)."""

from __future__ import annotations

import torch
from torch import nn

import quantfx as qf
from quantfx.qmath import sqnr_db


def _outlier_on_a_silent_input() -> nn.Module:
    """A linear layer whose largest weights read input 0, which calibration never drives."""
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[0].weight[:, 0] = 8.0
        model[0].bias.zero_()
    return model


def _calibrated(model: nn.Module, bits: int) -> nn.Module:
    silent = torch.rand(64, 4) + 0.5
    silent[:, 0] = 0.0
    config = qf.QuantConfig(activation_bits=bits, weight_bits=bits, bias_calibration=False,
                            progress=False)
    prepared = qf.prepare(model, (silent[:1],), config)
    qf.calibrate(prepared, [silent])
    return qf.convert(prepared)


def test_sixteen_bit_weights_never_clip_what_calibration_did_not_exercise():
    """The output search saw no error from clipping column 0 on the calibration data, so it
    clipped it; at 16 bit that bought nothing and broke every image that drives input 0
    (EfficientNet-Lite2 16-bit: 33.6 dB held apart against 56.4 dB)."""
    model = _outlier_on_a_silent_input()
    converted = _calibrated(model, 16)
    layer = converted.get_submodule("0")
    assert int(layer.weight_exponent) == -11  # 8.0 fits unclipped
    assert sqnr_db(model[0].weight, layer.layer.weight) > 60.0


def test_tda4vm_calibration_sees_the_weight_exponent_its_16_bit_biases_force():
    """TDA4VM keeps 8-bit layers' biases in 16 bit; a BN-folded bias far above its weights
    raises the weight exponent at convert. Calibration applies the same rule, so what it
    measures and corrects is what the file computes (EfficientNet-Lite1 on TDA4VM: the
    calibrated model measured 16.1 dB, the converted one 11.8, before)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([1.0, -0.8, 0.6, 0.5]))
    data = torch.rand(32, 3, 8, 8)
    config = qf.QuantConfig(target="tda4vm", progress=False, widen_sensitive_layers=False,
                            widen_coarse_weights=False)
    prepared = qf.calibrate(qf.prepare(model, (data[:1],), config), [data])
    converted = qf.convert(prepared)
    calibrated = prepared.get_submodule("2").weight_quantizer.exponent
    assert int(converted.get_submodule("2").weight_exponent) == int(calibrated)
    never_clipping = int(torch.ceil(torch.log2(model[2].weight.abs().max() / 127)))
    assert int(calibrated) > never_clipping  # the bias rule, not the weights, set it
