"""Quantizer modules and their modes."""

import pytest
import torch
from torch import nn

import quantfx as qf
from quantfx.quantizers import CalibrationQuantizer


def test_quant_mode_restores_what_it_found_even_on_error():
    from quantfx.quantizers import quant_mode

    prepared = qf.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(),
                          torch.randn(1, 3, 8, 8), qf.QuantConfig(progress=False))
    quantizers = [m for m in prepared.modules() if isinstance(m, CalibrationQuantizer)]
    quantizers[0].set_mode(observe=False, quantize=True)  # a mixed state to come back to
    before = [(bool(q.observer_enabled), bool(q.quant_enabled)) for q in quantizers]
    with pytest.raises(RuntimeError, match="inside"), quant_mode(prepared, False, False):
        assert not any(bool(q.observer_enabled) or bool(q.quant_enabled) for q in quantizers)
        raise RuntimeError("inside")
    assert [(bool(q.observer_enabled), bool(q.quant_enabled)) for q in quantizers] == before
