"""Power-of-2 quantization math: exponents, rounding, saturation, STE."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantfx.qmath import (
    EMPTY_TENSOR_EXPONENT,
    exponent_for_max,
    fake_quantize,
    fake_quantize_learned,
    from_codes,
    qrange,
    sqnr_db,
    to_codes,
)

finite_floats = st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False)


def test_qrange():
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(16, True) == (-32768, 32767)
    assert qrange(16, False) == (0, 65535)


@given(max_abs=finite_floats, qmax=st.sampled_from([127, 255, 32767, 65535]))
def test_exponent_is_smallest_that_never_clips(max_abs, qmax):
    exponent = int(exponent_for_max(torch.tensor(max_abs), qmax))
    assert max_abs <= qmax * 2.0**exponent
    assert max_abs > qmax * 2.0 ** (exponent - 1)


def test_exponent_exact_at_powers_of_two():
    # 127 * 2**-3 fits exactly at exponent -3; one ulp more needs -2.
    value = torch.tensor(127 * 2.0**-3, dtype=torch.float64)
    assert int(exponent_for_max(value, 127)) == -3
    assert (
        int(exponent_for_max(torch.nextafter(value, torch.tensor(1e9, dtype=torch.float64)), 127))
        == -2
    )


def test_exponent_of_zero_and_per_channel():
    exponents = exponent_for_max(torch.tensor([0.0, 1.0, 100.0]), 127)
    assert exponents.tolist() == [EMPTY_TENSOR_EXPONENT, -6.0, 0.0]


@settings(deadline=None, max_examples=60)
@given(
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=64),
    exponent=st.integers(-20, 8),
    bits=st.sampled_from([8, 16]),
    signed=st.booleans(),
)
def test_fake_quantize_is_round_half_even_and_saturates(values, exponent, bits, signed):
    x = torch.tensor(values, dtype=torch.float32)
    qmin, qmax = qrange(bits, signed)
    scale = 2.0**exponent
    expected = torch.clamp(torch.round(x.double() / scale), qmin, qmax) * scale
    result = fake_quantize(x, torch.tensor(float(exponent)), qmin, qmax)
    assert torch.equal(result.double(), expected)
    codes = to_codes(x, torch.tensor(float(exponent)), qmin, qmax)
    assert torch.equal(from_codes(codes, torch.tensor(float(exponent))).double(), expected)


def test_round_half_to_even_ties():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    result = fake_quantize(x, torch.tensor(0.0), -128, 127)
    assert result.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0]


def test_per_channel_fake_quantize_uses_each_channels_scale():
    x = torch.tensor([[0.3, 0.7], [3.0, 7.0]])
    exponents = torch.tensor([-2.0, 1.0])
    result = fake_quantize(x, exponents, -128, 127, axis=0)
    assert result.tolist() == [[0.25, 0.75], [4.0, 8.0]]


def test_straight_through_gradient_is_masked_by_saturation():
    x = torch.tensor([-200.0, -1.3, 0.2, 126.6, 300.0], requires_grad=True)
    fake_quantize(x, torch.tensor(0.0), -128, 127).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_sqnr():
    reference = torch.ones(100)
    assert sqnr_db(reference, reference) == math.inf
    assert sqnr_db(reference, reference * 1.1) == pytest.approx(20.0, abs=1e-4)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), axis=st.sampled_from([0, 1]))
def test_per_channel_learned_thresholds_get_each_channels_own_gradient(seed, axis):
    """One threshold per channel: its value and gradients are those of the per-tensor TQT
    quantizer applied to that channel alone (some channels saturate, some do not)."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(4, 5, 3, generator=generator) * torch.rand(1, generator=generator) * 4
         ).double()  # in double: the two ways of summing then agree to rounding
    thresholds = (torch.rand(x.shape[axis], generator=generator) * 4 - 3).double()
    thresholds.requires_grad_()
    exponents = torch.ceil(thresholds.detach()) - 7
    grad = torch.randn(x.shape, generator=generator).double()
    x.requires_grad_()
    output = fake_quantize_learned(x, thresholds, exponents, -128, 127, axis=axis)
    output.backward(grad)
    for channel in range(x.shape[axis]):
        piece = x.detach().select(axis, channel).clone().requires_grad_()
        threshold = thresholds.detach()[channel].clone().requires_grad_()
        alone = fake_quantize_learned(piece, threshold, exponents[channel], -128, 127)
        alone.backward(grad.select(axis, channel))
        assert torch.equal(alone, output.detach().select(axis, channel))
        assert torch.equal(piece.grad, x.grad.select(axis, channel))
        assert torch.allclose(threshold.grad, thresholds.grad[channel], rtol=1e-9, atol=1e-15)
