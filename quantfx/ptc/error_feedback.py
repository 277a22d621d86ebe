"""Weight rounding with error feedback (GPTQ, Frantar et al. 2022), on quantfx's power-of-2
grids: `QuantConfig(weight_rounding="error_feedback")`, the default.

Each conv/linear layer, in graph order, on its *quantized* input (the layers before it already
rounded; `quantfx.ptc.reconstruction`): the input's second moments H = E[x x^T] over every output
position say how an error in one weight column shows at the output, and the columns are
rounded one at a time, each column's rounding error spread over the columns not yet rounded so
that the layer's output moves least (the optimal update for a quadratic loss, via the Cholesky
factor of H^-1). The grid (every exponent) is the one calibration chose; the weights are set to
grid values, so convert, export and QAT need nothing new.

The layer's input is quantized, the target is what the float layer makes of the float input:
before rounding, the weights are moved towards the ones that map the quantized input closest
to that target (W + E[(t - W x_q) x_q^T] (H + damping)^-1, a ridge fit that shrinks towards
W), so the layer also takes back the error the layers above left in its input (as GPTAQ
does; AdaQuant and Vitis AI's fast finetune get the same by training). H and that
correction come from the first three quarters of the kept samples; the layer keeps whichever
of the corrected roundings (a light and a heavy ridge: how far the samples' input errors are
to be trusted differs from model to model), the plain one and round-to-nearest has the lowest
output error on the last quarter, which none of them saw.

Cost: the one pass of the two streams, the input moments (one product per layer input) and a
loop over the columns of each layer: seconds where learned rounding takes minutes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from quantfx.inputs import first_samples
from quantfx.layers import FakeQuantLayer
from quantfx.ptc.reconstruction import layer_output_error, round_weights
from quantfx.qmath import from_codes, to_codes

DAMPING = 0.01
"""Added to H's diagonal, as a share of its mean: keeps H invertible (dead inputs) and the
updates modest where the calibration data says little (GPTQ's default)."""
CORRECTION_DAMPINGS = (0.1, 1.0)
"""Ridges tried for the input-error correction (added to H's diagonal, as a share of its mean),
each a candidate the held-out quarter judges: the correction fits the samples' input errors,
not only their spread, and how far to trust it depends on the model (on held-apart data:
EfficientNet-Lite1 on TDA4VM 18.9 dB with 0.01, 19.1 with 0.1, 19.3 with 1.0; the Keras-style
CNN on TDA4VM 31.4 with 0.1, 30.8 with 1.0; on AM68A 31.6 with 0.1, 32.0 with 1.0)."""
MIN_POSITIONS = 20
"""A layer whose kept samples give fewer input positions than this many per weight column keeps
round-to-nearest: its H is estimated from too few vectors, and the rounding fits the
calibration samples instead of the layer (EfficientNet-Lite1's classifier: 64 samples for 1280
columns; per-channel Lite1 on held-apart photos 23.39 dB without this rule, 23.52 with it)."""
MAX_SAMPLES = 256
"""Kept samples a layer's input moments are measured on."""
HELD_OUT_SHARE = 0.25
"""Share of the samples (the last ones) kept out of the moments: the rounding is kept only if
it lowers the output error on them too, so it must carry to data it did not fit."""
CHUNK_ELEMENTS = 1 << 24
"""Unfolded input elements per product while the moments accumulate (bounds the memory)."""


def supported(layer: nn.Module) -> bool:
    """Linear and 1-D/2-D convolutions with numeric zero padding (not transposed)."""
    if isinstance(layer, nn.Linear):
        return True
    return (isinstance(layer, (nn.Conv1d, nn.Conv2d)) and not isinstance(layer.padding, str)
            and layer.padding_mode == "zeros")


def input_columns(layer: nn.Module, inputs: Tensor) -> Tensor:
    """The layer's input as (groups, positions, features per group): each output position's
    receptive field in the weight's flattening order (input channel, then kernel rows, cols)."""
    if isinstance(layer, nn.Linear):
        return inputs.reshape(1, -1, inputs.shape[-1])
    if isinstance(layer, nn.Conv2d) and inputs.dim() != 4:  # a BatchNormLayer on another rank
        inputs = inputs.reshape(inputs.shape[0], inputs.shape[1], -1, 1)
    if isinstance(layer, nn.Conv1d):
        inputs = inputs.unsqueeze(2)
        kernel, dilation, padding, stride = ((1, layer.kernel_size[0]), (1, layer.dilation[0]),
                                             (0, layer.padding[0]), (1, layer.stride[0]))
    else:
        kernel, dilation, padding, stride = (layer.kernel_size, layer.dilation, layer.padding,
                                             layer.stride)
    unfolded = F.unfold(inputs, kernel, dilation, padding, stride)  # (n, features, positions)
    return _by_group(unfolded, layer.groups)


def _by_group(values: Tensor, groups: int) -> Tensor:
    """(n, channels, positions...) as (groups, n x positions, channels per group)."""
    per_group = values.shape[1] // groups
    return values.reshape(values.shape[0], groups, per_group, -1).permute(1, 0, 3, 2).reshape(
        groups, -1, per_group)


def output_columns(layer: nn.Module, output: Tensor) -> Tensor:
    """The layer's output as (groups, positions, output channels per group), in the position
    order of `input_columns`."""
    if isinstance(layer, nn.Linear):
        return output.reshape(1, -1, output.shape[-1])
    return _by_group(output, layer.groups)


def grouped_weight(layer: nn.Module) -> Tensor:
    """The layer's weight as (groups, output channels per group, d), d in `input_columns`'
    order (one group for a linear layer)."""
    groups = layer.groups if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else 1
    return layer.weight.detach().reshape(groups, layer.weight.shape[0] // groups, -1)


def moments_and_residual(layer: nn.Module, inputs: Tensor, target: Tensor
                         ) -> tuple[Tensor, Tensor]:
    """H (groups, d, d) of the quantized `inputs`, and the residual's cross moment
    sum (t - b - W x) x^T (groups, rows, d) against float output `target`: what the
    input's quantization error does to the layer's output, as seen through its input."""
    weight = grouped_weight(layer).double()
    if layer.bias is not None:
        target = target - layer.bias.detach().reshape(
            (-1,) if isinstance(layer, nn.Linear) else (-1,) + (1,) * (target.dim() - 2))
    step = max(1, CHUNK_ELEMENTS // max(1, input_columns(layer, inputs[:1]).numel()))
    moments, residual = 0.0, 0.0
    for chunk, chunk_target in zip(inputs.split(step), target.split(step)):
        columns = input_columns(layer, chunk).double()
        error = output_columns(layer, chunk_target).double() - columns @ weight.mT
        moments = moments + columns.mT @ columns
        residual = residual + error.mT @ columns
    return moments, residual


def _damped(moments: Tensor, share: float) -> Tensor:
    """H with `share` of its mean diagonal added to the diagonal, per group."""
    diagonal = moments.diagonal(dim1=1, dim2=2)
    damped = moments.clone()
    damped.diagonal(dim1=1, dim2=2).add_(share * diagonal.mean(1, keepdim=True).clamp_min(1e-12))
    return damped


def corrected_weight(weight: Tensor, moments: Tensor, residual: Tensor,
                     damping: float = CORRECTION_DAMPINGS[0]) -> Tensor:
    """`weight` (groups, rows, d) plus the ridge fit of the residual on the input:
    W + R (H + damping)^-1, the weights that best map the quantized input to the target."""
    damped = _damped(moments, damping)
    return weight.double() + torch.linalg.solve(damped, residual.mT).mT


def _upper_inverse_factor(moments: Tensor) -> Tensor:
    """The upper Cholesky factor of (H + damping)^-1, per group."""
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(_damped(moments, DAMPING)))
    return torch.linalg.cholesky(inverse, upper=True)


def round_with_feedback(weight: Tensor, scale: Tensor, moments: Tensor, low: int,
                        high: int) -> Tensor:
    """Grid values of `weight` (groups, rows, d) on `scale` (same shape) within codes
    [low, high], each column's rounding error fed into the columns after it (GPTQ)."""
    factor = _upper_inverse_factor(moments)
    remaining = weight.double().clone()
    scale = scale.double()
    rounded = torch.empty_like(remaining)
    for column in range(remaining.shape[2]):
        values = remaining[:, :, column]
        step = scale[:, :, column]
        grid = torch.clamp(torch.round(values / step), low, high) * step
        rounded[:, :, column] = grid
        error = (values - grid) / factor[:, column, column].unsqueeze(1)
        remaining[:, :, column + 1:] -= error.unsqueeze(2) * factor[:, column, column + 1:
                                                                     ].unsqueeze(1)
    return rounded


def round_layer(layer: FakeQuantLayer, inputs: Tensor, target: Tensor,
                activation: nn.Module | None = None) -> tuple[float, float]:
    """Set `layer`'s weights to whichever grid values give the lowest output error (after its
    fused `activation`) against float `target` on the held-out quarter of `inputs`:
    round-to-nearest, error feedback, or error feedback from the input-error-corrected
    weights (one per ridge of CORRECTION_DAMPINGS). Returns the output MSE with
    round-to-nearest and with the rounding kept."""
    quantizer = layer.weight_quantizer
    weight = layer.layer.weight.detach()
    scale = from_codes(torch.ones_like(weight), quantizer.exponent, quantizer.axis)
    nearest = from_codes(to_codes(weight, quantizer.exponent, quantizer.qmin, quantizer.qmax,
                                  quantizer.axis), quantizer.exponent, quantizer.axis)
    nearest_error = layer_output_error(layer, inputs, target, nearest, activation)
    if not supported(layer.layer):
        layer.layer.weight.data.copy_(nearest)
        return nearest_error, nearest_error
    grouped = grouped_weight(layer.layer)
    grid_scale = scale.reshape(grouped.shape)
    fit = inputs.shape[0] - max(1, int(HELD_OUT_SHARE * inputs.shape[0]))
    columns = input_columns(layer.layer, inputs[:1])
    if fit < 1 or columns.shape[1] * fit < MIN_POSITIONS * columns.shape[2]:
        layer.layer.weight.data.copy_(nearest)
        return nearest_error, nearest_error
    moments, residual = moments_and_residual(layer.layer, inputs[:fit], target[:fit])
    candidates = [nearest] + [
        round_with_feedback(start, grid_scale, moments, quantizer.qmin,
                            quantizer.qmax).to(weight.dtype).reshape(weight.shape)
        for start in (grouped, *(corrected_weight(grouped, moments, residual, damping)
                                 for damping in CORRECTION_DAMPINGS))]
    held_out = [layer_output_error(layer, inputs[fit:], target[fit:], candidate, activation)
                for candidate in candidates]
    kept = candidates[held_out.index(min(held_out))]  # the simpler one on a tie
    layer.layer.weight.data.copy_(kept)
    if kept is nearest:
        return nearest_error, nearest_error
    return nearest_error, layer_output_error(layer, inputs, target, kept, activation)


def error_feedback_rounding(model: fx.GraphModule, batches: Sequence[tuple[Tensor, ...]],
                            progress: bool = True, bias_samples: int = 0
                            ) -> dict[str, tuple]:
    """Error-feedback rounding for every weight layer of a calibrated prepared model, in graph
    order, in one pass (exponents must be computed). With `bias_samples` > 0, each layer's
    bias then gets bias calibration's shift, from that many of the first samples (at most
    MAX_SAMPLES), in the same pass. Returns layer name -> (nearest MSE, kept MSE)."""
    return round_weights(model, first_samples(batches, MAX_SAMPLES), round_layer,
                         bias_samples, progress, "error-feedback rounding")
