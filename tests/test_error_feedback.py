"""Weight rounding with error feedback (quantfx/ptc/error_feedback.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import quantfx as qf
from quantfx.layers import layer_forward
from quantfx.ptc.error_feedback import (
    corrected_weight,
    input_columns,
    moments_and_residual,
    round_layer,
    round_with_feedback,
)
from quantfx.state import state_of


@pytest.mark.parametrize("layer", [
    nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2, bias=False),
    nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),  # depthwise
    nn.Conv1d(3, 5, 3, dilation=2, bias=False),
    nn.Linear(7, 3, bias=False),
])
def test_columns_times_the_flattened_weight_is_the_layer(layer):
    """The unfolding order must be the weight's: input channel, then kernel rows, columns."""
    torch.manual_seed(0)
    shape = {nn.Conv2d: (2, layer.weight.shape[1] * getattr(layer, "groups", 1), 9, 9),
             nn.Conv1d: (2, 3, 11), nn.Linear: (2, 5, 7)}[type(layer)]
    inputs = torch.randn(shape)
    groups = getattr(layer, "groups", 1)
    weight = layer.weight.detach().reshape(groups, layer.weight.shape[0] // groups, -1)
    columns = input_columns(layer, inputs)  # (groups, positions, d)
    products = columns @ weight.transpose(1, 2)  # (groups, positions, rows per group)
    with torch.no_grad():
        output = layer(inputs)
    if isinstance(layer, nn.Linear):
        expected = output.reshape(1, -1, output.shape[-1])
    else:
        flat = output.flatten(2)  # (n, channels, positions)
        expected = flat.reshape(flat.shape[0], groups, -1, flat.shape[2]).permute(
            1, 0, 3, 2).reshape(groups, -1, flat.shape[1] // groups)
    torch.testing.assert_close(products, expected, rtol=1e-4, atol=1e-4)
    moments, residual = moments_and_residual(layer, inputs, output)  # the target it makes
    assert moments.shape == (groups,) + (columns.shape[2],) * 2
    assert residual.shape == (groups, layer.weight.shape[0] // groups, columns.shape[2])
    assert float(residual.abs().max()) < 1e-4 * float(moments.abs().max())


def test_the_correction_takes_back_the_error_the_input_carries():
    """Float input x, quantized input 0.8 x + noise: the corrected weights map the quantized
    input to W x far closer than W does (about W / 0.8), and the bias is left out of the fit."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 6)
    float_inputs = torch.randn(4096, 12)
    inputs = 0.8 * float_inputs + 0.01 * torch.randn(4096, 12)
    with torch.no_grad():
        target = layer(float_inputs)
    weight = layer.weight.detach().unsqueeze(0)
    moments, residual = moments_and_residual(layer, inputs, target)
    corrected = corrected_weight(weight, moments, residual)[0].float()
    before = (inputs @ layer.weight.detach().T + layer.bias - target).pow(2).mean()
    after = (inputs @ corrected.T + layer.bias - target).pow(2).mean()
    assert after < 0.05 * before
    torch.testing.assert_close(corrected, layer.weight.detach() / 0.8, rtol=0.05, atol=0.02)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 8), st.integers(0, 10_000))
def test_uncorrelated_inputs_give_round_to_nearest(groups, rows, columns, seed):
    """With H diagonal no column's error shows in another's output: nothing to feed back."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(groups, rows, columns, generator=generator)
    scale = torch.full_like(weight, 2.0 ** -4)
    moments = torch.diag_embed(torch.rand(groups, columns, generator=generator) + 0.1).double()
    rounded = round_with_feedback(weight, scale, moments, -128, 127)
    nearest = torch.clamp(torch.round(weight / scale), -128, 127) * scale
    torch.testing.assert_close(rounded.float(), nearest)


def test_correlated_inputs_lower_the_output_error_and_stay_on_the_grid():
    torch.manual_seed(0)
    mixing = torch.randn(16, 16)
    inputs = torch.randn(4096, 16) @ mixing  # strongly correlated features
    weight = torch.randn(8, 16) * 0.05
    scale = torch.full_like(weight, 2.0 ** -6)
    moments = (inputs.T @ inputs).double().unsqueeze(0)
    rounded = round_with_feedback(weight.unsqueeze(0), scale.unsqueeze(0), moments, -128,
                                  127)[0].float()
    nearest = torch.round(weight / scale) * scale
    assert torch.equal(rounded / scale, torch.round(rounded / scale))  # grid values
    feedback_error = (inputs @ (rounded - weight).T).pow(2).mean()
    nearest_error = (inputs @ (nearest - weight).T).pow(2).mean()
    assert feedback_error < 0.7 * nearest_error


def test_calibration_with_error_feedback_keeps_grid_weights_and_starts_again_each_time():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
    data = [torch.rand(16, 3, 8, 8) for _ in range(2)]
    config = qf.QuantConfig(progress=False, weight_rounding="error_feedback",
                            per_channel_weights=False)
    prepared = qf.calibrate(qf.prepare(model, (data[0][:1],), config), data)
    first = prepared.get_submodule("0").layer.weight.detach().clone()
    assert prepared.get_submodule("0").float_weight is not None
    assert torch.equal(first, model[0].weight) is False
    qf.calibrate(prepared, data)  # from the float weights again: the same result
    assert torch.equal(prepared.get_submodule("0").layer.weight, first)
    converted = qf.convert(prepared)
    assert state_of(prepared).calibration_check.output_sqnr_db > 25.0
    layer = converted.get_submodule("0")
    torch.testing.assert_close(layer.layer.weight, first)


@pytest.mark.parametrize("fields, rounding", [
    ({}, "error_feedback"), ({"target": "tda4vm"}, "error_feedback"),
    ({"per_channel_depthwise": False}, "error_feedback"),
    ({"target": "tda4vm", "weight_rounding": "nearest"}, "nearest"),
    ({"target": "am68a"}, "error_feedback"), ({"per_channel_weights": True}, "error_feedback"),
    ({"target": "am68a", "per_channel_weights": False}, "error_feedback"),
    ({"weight_rounding": "learned"}, "learned")])
def test_error_feedback_is_the_default_on_every_grid(fields, rounding):
    assert qf.QuantConfig(**fields).rounding == rounding


def test_tda4vm_calibration_rounds_with_error_feedback_by_default():
    """The default is wired: a TDA4VM calibration keeps the float weights aside and rounds
    them by error feedback, as asking for it does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
    data = [torch.rand(16, 3, 8, 8) for _ in range(2)]
    weights = {}
    for rounding in (None, "error_feedback", "nearest"):
        config = qf.QuantConfig(progress=False, target="tda4vm", weight_rounding=rounding)
        prepared = qf.calibrate(qf.prepare(model, (data[0][:1],), config), data)
        weights[rounding] = prepared.get_submodule("2").layer.weight.detach().clone()
    assert torch.equal(weights[None], weights["error_feedback"])
    assert not torch.equal(weights[None], weights["nearest"])


def _calibrated_conv(inputs: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """A 3x3 conv (8 -> 8 channels, made from the global generator) calibrated on `inputs` with
    round-to-nearest, and its float output on them."""
    config = qf.QuantConfig(progress=False, weight_rounding="nearest")
    prepared = qf.calibrate(qf.prepare(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)).eval(),
                                       (inputs[:1],), config), [inputs])
    layer = prepared.get_submodule("0")
    with torch.no_grad():
        return layer, layer.layer(inputs)


def test_a_rounding_that_only_fits_its_samples_is_not_kept(monkeypatch):
    """The held-out quarter decides: a rounding that lowers the error on the samples it was
    fitted to, but not on the others, leaves round-to-nearest (it would not carry to data)."""
    from quantfx.ptc import error_feedback

    torch.manual_seed(0)
    inputs = torch.randn(16, 8, 16, 16)  # enough positions per weight column to fit H
    layer, target = _calibrated_conv(inputs)
    quantizer = layer.weight_quantizer
    nearest_weight = qf.qmath.fake_quantize(layer.layer.weight.detach(), quantizer.exponent,
                                            quantizer.qmin, quantizer.qmax)
    seen = []

    def errors(layer, inputs, target, weight, activation):  # the rounding: better on what it
        seen.append(len(inputs))  # fitted, worse on the held-out quarter
        held_out = len(inputs) < 16
        return 2.0 if held_out and not torch.equal(weight, nearest_weight) else 1.0

    monkeypatch.setattr(error_feedback, "layer_output_error", errors)
    nearest, kept = error_feedback.round_layer(layer, inputs, target)
    assert kept == nearest and 4 in seen
    assert torch.equal(layer.layer.weight.detach(), nearest_weight)


def test_a_layer_whose_input_lost_gain_keeps_the_corrected_rounding():
    """Wiring: round_layer rounds from the corrected weights when the quantized input carries
    an error the plain rounding cannot see (its output error falls below plain error
    feedback's on the same data)."""
    torch.manual_seed(0)
    inputs = torch.randn(32, 8, 12, 12)
    layer, target = _calibrated_conv(inputs)
    shrunk = 0.9 * inputs  # what the layers above left: a tenth of the signal lost
    weight = layer.layer.weight.detach().clone()
    _, kept = round_layer(layer, shrunk, target)
    quantizer = layer.weight_quantizer
    scale = 2.0 ** quantizer.exponent
    assert torch.equal(layer.layer.weight / scale, torch.round(layer.layer.weight / scale))
    layer.layer.weight.data.copy_(weight)
    moments, _ = moments_and_residual(layer.layer, shrunk, target)
    plain = round_with_feedback(weight.reshape(1, 8, -1), torch.full((1, 8, 72), float(scale)),
                                moments, quantizer.qmin, quantizer.qmax).float().reshape(
                                    weight.shape)
    with torch.no_grad():
        plain_error = float((layer_forward(layer.layer, shrunk, plain, layer.layer.bias)
                             - target).double().pow(2).mean())
    assert kept < 0.2 * plain_error


def test_each_ridge_of_the_correction_is_a_candidate_the_held_out_quarter_judges(monkeypatch):
    """Wiring: one corrected rounding per ridge of CORRECTION_DAMPINGS (how far the samples'
    input errors are trusted differs between models), each judged on the held-out quarter."""
    from quantfx.ptc import error_feedback

    torch.manual_seed(0)
    inputs = torch.randn(16, 8, 12, 12)
    layer, target = _calibrated_conv(inputs)
    ridges, judged = [], []
    monkeypatch.setattr(error_feedback, "corrected_weight", lambda weight, moments, residual,
                        damping: ridges.append(damping) or weight.double())
    measure = error_feedback.layer_output_error
    monkeypatch.setattr(error_feedback, "layer_output_error",
                        lambda layer, inputs, *rest: judged.append(len(inputs))
                        or measure(layer, inputs, *rest))
    round_layer(layer, 0.9 * inputs, target)
    assert ridges == list(error_feedback.CORRECTION_DAMPINGS) and len(set(ridges)) == 2
    assert judged.count(4) == 2 + len(ridges)  # nearest, plain and each corrected, held out
