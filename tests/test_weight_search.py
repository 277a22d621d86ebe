"""Weight exponents chosen by the layer's output error (`quantfx.weight_search`)."""

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
