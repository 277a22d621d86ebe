"""Power-of-2 symmetric fixed-point arithmetic: ranges, exponents, (fake) quantization.

A quantized tensor is ``q = clamp(round_half_even(x / 2**exponent), qmin, qmax)`` and its
dequantized value is ``q * 2**exponent``; the zero point is always 0. Because every scale is a
power of two, quantize/dequantize are exact float operations, which is what lets the PyTorch
simulation and ONNX Runtime agree bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EMPTY_TENSOR_EXPONENT = -8
"""Exponent given to a tensor that was only ever observed as zeros: any scale represents it."""


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a `bits`-wide signed (two's complement) or unsigned quantized tensor."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def exponent_for_max(max_abs: Tensor, qmax: int) -> Tensor:
    """Smallest exponent k with ``max_abs <= qmax * 2**k``: the power-of-2 scale that never clips.

    Works elementwise (per-channel maxima); zeros get `EMPTY_TENSOR_EXPONENT`. Exact: the
    estimate from log2 is corrected with float comparisons that involve only exact values.
    """
    max_abs = max_abs.detach().to(torch.float64)
    positive = max_abs > 0
    safe = torch.where(positive, max_abs, torch.ones_like(max_abs))
    exponent = torch.ceil(torch.log2(safe / qmax))
    # log2 can be off by one ulp near exact powers of two: fix with exact comparisons.
    exponent = torch.where(safe > qmax * torch.exp2(exponent), exponent + 1, exponent)
    exponent = torch.where(safe <= qmax * torch.exp2(exponent - 1), exponent - 1, exponent)
    exponent = torch.where(positive, exponent, torch.full_like(exponent, EMPTY_TENSOR_EXPONENT))
    return exponent.to(torch.float32)


def scale_of(exponent: Tensor) -> Tensor:
    """The power-of-2 scale ``2**exponent`` as float32 (exact for any |exponent| < 126)."""
    return torch.exp2(exponent.to(torch.float32))


def fake_quantize(
    x: Tensor, exponent: Tensor, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """Quantize and dequantize `x` (round half to even, saturate), with a straight-through gradient.

    The gradient passes unchanged where `x` lies inside the representable range and is zero
    where it saturated (the clipped STE). `exponent` is a scalar, or a vector along `axis`.
    Uses torch's fused fake-quant kernels, whose rounding is ``nearbyint`` (half to even).
    """
    scale = scale_of(exponent)
    if axis is None:
        zero_point = torch.zeros((), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point, qmin, qmax)
    zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=x.device)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)


def quantize(x: Tensor, exponent: Tensor, qmin: int, qmax: int, axis: int | None = None) -> Tensor:
    """Integer codes of `x` as an int64 tensor (no gradient): the values the engine stores."""
    scale = scale_of(exponent).to(x.device)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    return torch.clamp(torch.round(x.detach() / scale), qmin, qmax).to(torch.int64)


def dequantize(q: Tensor, exponent: Tensor, axis: int | None = None) -> Tensor:
    """Float32 values ``q * 2**exponent`` of integer codes `q`."""
    scale = scale_of(exponent).to(q.device)
    if axis is not None:
        shape = [1] * q.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    return q.to(torch.float32) * scale


def sqnr_db(reference: Tensor, approximation: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB of `approximation` against `reference`."""
    reference = reference.detach().to(torch.float64)
    noise = approximation.detach().to(torch.float64) - reference
    noise_power = noise.pow(2).sum().item()
    signal_power = reference.pow(2).sum().item()
    if noise_power == 0.0:
        return float("inf")
    if signal_power == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal_power / noise_power)
