"""Learned rounding (AdaRound-style) on power-of-2 grids: never worse than round-to-nearest on
the layer it tunes, better on a constructed example, and a normal citizen of the workflow."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import quantfx as qf
from quantfx.layers import FakeQuantLayer
from quantfx.ptc.learned_rounding import TILE, learn_layer_rounding, step_sample
from quantfx.quantizers import QuantizerFactory
from tests.helpers import ConvBnReLU, randomize_batchnorm

FAST = dict(progress=False, weight_rounding="learned")


def _layer(layer: nn.Module) -> FakeQuantLayer:
    quantizer = QuantizerFactory(qf.QuantConfig(weight_observer="minmax")).weight(layer, 8)
    quantizer.set_mode(observe=True, quantize=False)
    quantizer(layer.weight)
    quantizer.compute_exponent()
    quantizer.set_mode(observe=False, quantize=True)
    return FakeQuantLayer(layer, quantizer)


@pytest.mark.parametrize("build", [
    lambda: (nn.Linear(32, 10), (512, 32)),
    lambda: (nn.Conv2d(6, 8, 3, padding=1), (256, 6, 6, 6)),
])
def test_learned_rounding_beats_nearest_on_quantized_inputs(build):
    torch.manual_seed(0)
    layer, shape = build()
    inputs = torch.relu(torch.randn(shape)) + 0.05
    target = layer(inputs).detach()
    coarse = torch.round(inputs * 8) / 8  # the layer sees a quantized input: rounding can help
    fake = _layer(layer)
    nearest, kept = learn_layer_rounding(fake, coarse, target, iterations=300)
    assert kept < 0.97 * nearest  # a real improvement, not noise
    # the weights are now on the grid: round-to-nearest at the same exponent reproduces them
    assert torch.equal(fake.weight_quantizer(fake.layer.weight), fake.layer.weight)


def test_it_never_keeps_a_worse_rounding():
    torch.manual_seed(1)
    layer = nn.Linear(16, 4)
    inputs = torch.randn(64, 16)
    fake = _layer(layer)
    nearest_weight = fake.weight_quantizer(layer.weight).detach().clone()
    # a target the learned rounding cannot reach better than nearest: nearest's own output
    target = nn.functional.linear(inputs, nearest_weight, layer.bias).detach()
    nearest, kept = learn_layer_rounding(fake, inputs, target, iterations=50)
    assert kept <= nearest and torch.equal(fake.layer.weight, nearest_weight)


def test_calibrate_with_learned_rounding_is_repeatable_and_exports(tmp_path, monkeypatch):
    monkeypatch.setattr("quantfx.ptc.learned_rounding.ITERATIONS", 40)  # the workflow, not quality
    torch.manual_seed(0)
    model = randomize_batchnorm(ConvBnReLU()).eval()
    data = [torch.randn(8, 3, 12, 12) for _ in range(3)]
    prepared = qf.prepare(model, data[0][:1], qf.QuantConfig(**FAST))
    qf.calibrate(prepared, data)
    first = qf.convert(prepared)
    qf.calibrate(prepared, data)  # again: starts from the float weights, same result
    second = qf.convert(prepared)
    x = torch.randn(64, 3, 12, 12)
    assert torch.equal(first(x), second(x))
    plain = qf.prepare(model, data[0][:1], qf.QuantConfig(progress=False))
    qf.calibrate(plain, data)
    assert not torch.equal(qf.convert(plain)(x), first(x))  # it did change something
    fresh = qf.prepare(model, data[0][:1], qf.QuantConfig(**FAST))
    fresh.load_state_dict(prepared.state_dict())  # the float weights come along
    assert torch.equal(qf.convert(fresh)(x), first(x))
    qf.calibrate(fresh, data)  # a reloaded model calibrates again from the float weights
    assert torch.equal(qf.convert(fresh)(x), first(x))
    plain.load_state_dict(fresh.state_dict())  # into a model that never learned: no error
    assert torch.equal(qf.convert(plain)(x), first(x))
    report = qf.export_onnx(first, (x,), tmp_path / "learned.onnx")
    assert report.fraction_identical == 1.0
    # calibrating on other data starts from the float weights, as a fresh model would (from
    # the rounded ones, the same data gave the same result, and hid a missing restore)
    other = [torch.randn(8, 3, 12, 12) for _ in range(3)]
    qf.calibrate(prepared, other)
    fresh = qf.prepare(model, data[0][:1], qf.QuantConfig(**FAST))
    qf.calibrate(fresh, other)
    assert torch.equal(qf.convert(prepared)(x), qf.convert(fresh)(x))


def test_the_option_is_checked():
    with pytest.raises(qf.ConfigError, match="weight_rounding"):
        qf.QuantConfig(weight_rounding="adaround")


@settings(max_examples=25, deadline=None)
@given(stride=st.integers(1, 3), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       kernel=st.sampled_from([1, 3, 5]), depthwise=st.booleans(), height=st.integers(9, 30),
       seed=st.integers(0, 1000))
def test_a_step_on_an_output_tile_computes_that_tile(stride, padding, dilation, kernel,
                                                     depthwise, height, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 4, kernel, stride, padding, dilation, groups=4 if depthwise else 1)
    inputs = torch.randn(3, 4, height, 23)
    if (height + 2 * padding - dilation * (kernel - 1) - 1) < 0:
        return
    with torch.no_grad():
        target = conv(inputs)
        generator = torch.Generator().manual_seed(seed)
        _, tile, forward = step_sample(conv, inputs, target, generator)
        assert max(tile.shape[-2:]) <= TILE
        assert torch.allclose(forward(conv.weight), tile, atol=1e-5)
