"""Power-of-2 symmetric fixed-point arithmetic: ranges, exponents, (fake) quantization.

A quantized tensor is ``q = clamp(round_half_even(x / 2**exponent), qmin, qmax)`` and its
dequantized value is ``q * 2**exponent``; the zero point is always 0. Because every scale is a
power of two, quantize/dequantize are exact float operations, which is what lets the PyTorch
simulation and ONNX Runtime agree bit for bit. Everything numeric that the back ends share lives
here: integer codes, the int32 bias grid, the straight-through estimators. No torch.fx.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

EMPTY_TENSOR_EXPONENT = -8
"""Exponent given to a tensor that was only ever observed as zeros: any scale represents it."""


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a `bits`-wide signed (two's complement) or unsigned quantized tensor."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def is_power_of_two(value: float) -> bool:
    """Whether `value` is exactly 2**k for an integer k (a valid quantfx scale)."""
    if not math.isfinite(value) or value <= 0:
        return False
    mantissa, _ = math.frexp(value)
    return mantissa == 0.5


def channel_shape(dims: int, axis: int) -> list[int]:
    """The shape that broadcasts a per-channel vector along `axis` of a `dims`-D tensor."""
    shape = [1] * dims
    shape[axis] = -1
    return shape


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


def never_clipping_exponent(weight: Tensor, qmax: int, axis: int | None) -> Tensor:
    """Never-clipping exponent(s) of `weight`: per tensor, or per channel along axis 0.

    The numbers a fresh min/max observer proposes for the same weight.
    """
    magnitude = weight.detach().abs()
    if axis is None:
        return exponent_for_max(magnitude.max(), qmax)
    return exponent_for_max(magnitude.flatten(1).amax(dim=1), qmax)


WEIGHT_SEARCH_DEPTH = 4
"""How many exponents below the never-clipping one the least-error weight search considers."""


def weight_squared_error(weight: Tensor, exponent: Tensor, qmax: int,
                         axis: int | None) -> Tensor:
    """Squared rounding + clipping error of `weight` at `exponent` (float64; per channel along
    axis 0 when `axis` is set)."""
    weight = weight.detach().float()
    error = (fake_quantize(weight, exponent, -qmax - 1, qmax, axis) - weight).pow(2)
    if axis is None:
        return error.sum().to(torch.float64)
    return error.transpose(0, axis).reshape(error.shape[axis], -1).sum(1).double()


def least_error_exponent(weight: Tensor, qmax: int, axis: int | None,
                         no_clip: Tensor | None = None) -> Tensor:
    """Among the never-clipping exponent (or `no_clip`) and up to `WEIGHT_SEARCH_DEPTH` below
    it, the one with the least squared weight error (per channel along `axis`): clipping rare
    outlier weights where that halves the step of all the others. Ties keep the larger."""
    best = never_clipping_exponent(weight, qmax, axis) if no_clip is None else no_clip
    best_error = weight_squared_error(weight, best, qmax, axis)
    start = best
    for step in range(1, WEIGHT_SEARCH_DEPTH + 1):
        candidate = start - step
        error = weight_squared_error(weight, candidate, qmax, axis)
        better = error < best_error
        best = torch.where(better, candidate, best)
        best_error = torch.where(better, error, best_error)
    return best


WEIGHT_RULES = ("minmax", "mse")
"""How a weight's exponent is chosen: never clipping, or `least_error_exponent`."""


def weight_exponent(weight: Tensor, qmax: int, axis: int | None, rule: str) -> Tensor:
    """The exponent(s) of `weight` under `rule` ("minmax" or "mse", see `WEIGHT_RULES`)."""
    if rule == "mse":
        return least_error_exponent(weight, qmax, axis)
    return never_clipping_exponent(weight, qmax, axis)


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


def _broadcast_scale(exponent: Tensor, like: Tensor, axis: int | None) -> Tensor:
    scale = scale_of(exponent).to(like.device)
    return scale if axis is None else scale.reshape(channel_shape(like.dim(), axis))


def to_codes(x: Tensor, exponent: Tensor, qmin: int, qmax: int, axis: int | None = None) -> Tensor:
    """Integer codes of `x` as an int64 tensor (no gradient): the values the engine stores."""
    scale = _broadcast_scale(exponent, x, axis)
    return torch.clamp(torch.round(x.detach() / scale), qmin, qmax).to(torch.int64)


def from_codes(codes: Tensor, exponent: Tensor, axis: int | None = None) -> Tensor:
    """Float32 values ``codes * 2**exponent`` of integer codes."""
    return codes.to(torch.float32) * _broadcast_scale(exponent, codes, axis)


def fit_bias_exponent(weight_exponent: Tensor, input_exponent: Tensor,
                      bias: Tensor | None, bias_bits: int = 32) -> Tensor:
    """Raise the weight exponent where the bias at input x weight scale would overflow its
    `bias_bits`-wide integer (32, or 16 for engines that keep biases in 16 bit).

    ONNX Runtime's quantizer does this silently for int32, TDA4VM's TIDL for its 16-bit
    biases; doing it here keeps the exported file and the simulation on the same scales.
    """
    if bias is None:
        return weight_exponent
    magnitude = bias.detach().abs()
    if weight_exponent.dim() == 0:
        magnitude = magnitude.max()
    needed = exponent_for_max(magnitude, qrange(bias_bits, signed=True)[1]) - input_exponent
    needed = torch.where(magnitude > 0, needed, weight_exponent)
    return torch.maximum(weight_exponent, needed)


# ---------------------------------------------------------------------------- training (STE)


class _RoundToGridSTE(torch.autograd.Function):
    """Round onto a power-of-2 grid exactly as `convert` does, with an identity gradient."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, exponent: Tensor, qmin: int, qmax: int, axis: int | None
    ) -> Tensor:
        return from_codes(to_codes(x, exponent, qmin, qmax, axis), exponent, axis).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        return grad, None, None, None, None


class _FakeQuantizeSTE(torch.autograd.Function):
    """Training-time fake quantization: the values of `fake_quantize`, computed faster.

    torch's fused CPU fake-quant kernel rounds element by element with `nearbyint` (measured
    here: 28 ms for a 3M-element tensor); multiply, round (half to even), clamp, multiply by a
    power of 2 give the same bits in about 6 ms. The backward is the clipped STE: the gradient
    passes where x rounds inside [qmin, qmax] (one fused `hardtanh_backward`), or everywhere
    when `clip_gradient` is False (weights, whose exponent never clips).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, exponent: Tensor, qmin: int, qmax: int,
                axis: int | None, clip_gradient: bool) -> Tensor:
        scale = torch.exp2(exponent.detach().to(x.dtype))
        if axis is not None:
            scale = scale.reshape(channel_shape(x.dim(), axis))
        output = torch.mul(x, torch.reciprocal(scale))
        output.round_().clamp_(qmin, qmax).mul_(scale)
        ctx.clip = None
        if clip_gradient and axis is None:
            step = float(scale)
            ctx.clip = ((qmin - 0.5) * step, (qmax + 0.5) * step)
            ctx.save_for_backward(x)
        return output

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.clip is None:
            return grad, None, None, None, None, None
        (x,) = ctx.saved_tensors
        low, high = ctx.clip
        return torch.ops.aten.hardtanh_backward(grad, x, low, high), None, None, None, None, None


class _LearnedThresholdFakeQuantize(torch.autograd.Function):
    """TQT (Jain et al. 2019, arXiv:1903.08066): fake quantization at `exponent` =
    ceil(log2_threshold) - offset, differentiable in the log2 threshold (one per tensor, or
    one per channel along `axis`).

    Forward: the values of `fake_quantize` at `exponent`. Backward: the clipped STE for x; for
    the threshold, the paper's gradient through the ceiling (straight-through):
    d out / d log2_threshold = scale * ln 2 * (round(x/scale) - x/scale) where x rounds inside
    the grid, scale * ln 2 * qmin or qmax where it saturates; summed over the tensor (or the
    channel) and multiplied by `gradient_scale` (LSQ's 1/sqrt(elements * qmax) keeps one
    optimizer step of the threshold comparable across tensor sizes; 0 once frozen)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, log2_threshold: Tensor, exponent: Tensor, qmin: int,
                qmax: int, gradient_scale: float, axis: int | None) -> Tensor:
        scale = torch.exp2(exponent.detach()).to(x.dtype)
        if axis is not None:
            scale = scale.reshape(channel_shape(x.dim(), axis))
        output = torch.mul(x, torch.reciprocal(scale)).round_().clamp_(qmin, qmax).mul_(scale)
        ctx.axis, ctx.gradient_scale, ctx.bounds = axis, gradient_scale, (qmin - 0.5, qmax + 0.5)
        ctx.clip = None if axis is not None else tuple(b * float(scale) for b in ctx.bounds)
        ctx.save_for_backward(x, output, scale)
        return output

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        """s * ln2 * (q - x/s) inside and s * ln2 * q where saturated sum to
        ln2 * (sum(grad * output) - sum(grad_x * x)), grad_x the clipped STE's."""
        x, output, scale = ctx.saved_tensors
        if ctx.axis is not None:
            return _per_channel_threshold_backward(ctx, grad, x, output, scale)
        grad_x = torch.ops.aten.hardtanh_backward(grad, x, *ctx.clip)
        if ctx.gradient_scale == 0.0:
            return grad_x, torch.zeros((), device=grad.device), None, None, None, None, None
        inside = torch.dot(grad_x.reshape(-1), x.reshape(-1))
        if bool(torch.isnan(inside)):  # masked -inf inputs (0 * -inf): they count as saturated
            inside = torch.dot(grad_x.reshape(-1), x.nan_to_num(neginf=0.0).reshape(-1))
        difference = torch.dot(grad.reshape(-1), output.reshape(-1)) - inside
        threshold_grad = difference * (math.log(2.0) * ctx.gradient_scale)
        return grad_x, threshold_grad.reshape(()), None, None, None, None, None


def _per_channel_threshold_backward(ctx: Any, grad: Tensor, x: Tensor, output: Tensor,
                                    scale: Tensor) -> tuple[Tensor | None, ...]:
    """The backward of `_LearnedThresholdFakeQuantize` with one threshold per channel (weights:
    small tensors, so plain masks and sums)."""
    low, high = ctx.bounds
    inside = (x > low * scale) & (x < high * scale)
    grad_x = grad * inside
    others = [dim for dim in range(x.dim()) if dim != ctx.axis]
    difference = (grad * output - grad_x * x).sum(dim=others)
    threshold_grad = difference * (math.log(2.0) * ctx.gradient_scale)
    return grad_x, threshold_grad, None, None, None, None, None


def fake_quantize_learned(x: Tensor, log2_threshold: Tensor, exponent: Tensor, qmin: int,
                          qmax: int, learn: bool = True, axis: int | None = None) -> Tensor:
    """`fake_quantize` at `exponent` (= ceil(log2_threshold) - offset) with TQT's gradient for
    the threshold(s) (see `_LearnedThresholdFakeQuantize`; one per channel along `axis`); with
    `learn` False the threshold's gradient is zero (frozen, yet still used, as
    DistributedDataParallel requires)."""
    per_threshold = x.numel() // max(log2_threshold.numel(), 1)
    gradient_scale = 1.0 / math.sqrt(max(per_threshold, 1) * qmax) if learn else 0.0
    return _LearnedThresholdFakeQuantize.apply(x, log2_threshold, exponent, qmin, qmax,
                                               gradient_scale, axis)


def fake_quantize_ste(x: Tensor, exponent: Tensor, qmin: int, qmax: int,
                      axis: int | None = None, clip_gradient: bool = True) -> Tensor:
    """`fake_quantize` for training: same values, faster on CPU, clipped STE gradient."""
    if axis is not None and clip_gradient:
        return fake_quantize(x, exponent, qmin, qmax, axis)
    return _FakeQuantizeSTE.apply(x, exponent, qmin, qmax, axis, clip_gradient)


def bias_to_grid(bias: Tensor, exponent: Tensor, axis: int | None, bits: int = 32) -> Tensor:
    """The bias on the `bits`-wide integer grid at `exponent` (input + weight exponent),
    straight-through."""
    low, high = qrange(bits, signed=True)
    return _RoundToGridSTE.apply(bias, exponent, low, high, axis)


def per_tensor_cost(values: Tensor, bits: int = 8) -> tuple[float, Tensor]:
    """What one never-clipping power-of-2 scale costs per-channel `values` (a standalone
    BatchNorm's channel scales, which TIDL runs per tensor): their SQNR in dB, and the codes."""
    qmax = qrange(bits, signed=True)[1]
    exponent = exponent_for_max(values.detach().abs().max(), qmax)
    codes = to_codes(values.detach(), exponent, -qmax - 1, qmax)
    return sqnr_db(values.detach(), from_codes(codes, exponent)), codes


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
