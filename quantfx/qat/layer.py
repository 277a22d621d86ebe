"""`QATLayer`: a conv/linear (+ BatchNorm folded on the fly) that trains through its quantizers.

Train mode with live BN statistics: torch.ao's ConvBn (Krishnamoorthi 2018, section 3.2): the
weight is scaled by ``gamma / sqrt(running_var + eps)``, fake-quantized, the conv output is
scaled back and the BatchNorm itself normalizes with batch statistics (so running statistics
keep updating). Frozen BN or eval: the BN-folded layer exactly as `convert` builds it, weight
at the exponent its quantizer's rule gives (`WeightQuantizer.rule`), bias on the int32 grid of
input + weight exponent included, so the eval and converted models agree bit for bit.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from quantfx.layers import FakeQuantLayer, layer_forward
from quantfx.passes.fuse import folded_weight_bias
from quantfx.qmath import (
    bias_to_grid,
    channel_shape,
    fake_quantize,
    fake_quantize_ste,
    fit_bias_exponent,
    weight_exponent,
)
from quantfx.quantizers import Quantizer, WeightQuantizer


def _sigma_clipped_std(rows: Tensor, num_std: float) -> Tensor:
    """Standard deviation of each row, recomputed without the values beyond `num_std` of it.

    One round of sigma clipping: a single extreme outlier inflates the plain std (and so its
    own clip limit); the second pass measures the spread of the ordinary weights.
    """
    std = rows.std(dim=1, keepdim=True)
    keep = (rows.abs() <= num_std * std).to(rows.dtype)
    count = keep.sum(dim=1, keepdim=True).clamp(min=2)
    mean = (rows * keep).sum(dim=1, keepdim=True) / count
    variance = (((rows - mean) * keep) ** 2).sum(dim=1, keepdim=True) / (count - 1)
    return variance.sqrt().squeeze(1)


MIN_CHANNEL_WEIGHTS = 32
"""`QATSchedule.weight_clip_std`: a weight is an outlier only when it is one in its tensor *and*
in its output channel (by the channel's median absolute deviation, which one outlier cannot
inflate); a channel of fewer weights (a 3x3 depthwise filter, a 3-channel 3x3 stem) cannot tell
an outlier from its own strong taps, so its weights are never clipped. (EfficientNet-Lite1 on
TDA4VM, started from calibration: the tensor rule alone clipped whole BN-scaled channels, 39 %
of the stem's energy, and the QAT model fell from PTC's 11.8 dB to -2.0 dB before its first
step.)"""

class QATLayer(FakeQuantLayer):
    """conv/linear (+ optional BatchNorm folded on the fly) with a fake-quantized weight.

    `input_quantizer` is a plain reference (not a submodule: the graph module owns it) to the
    quantizer of the layer's input, whose exponent places the bias on its int32 grid.
    """

    def __init__(self, layer: nn.Module, bn: nn.Module | None, weight_quantizer: Quantizer,
                 input_quantizer: Quantizer | None = None, bias_bits: int = 32) -> None:
        super().__init__(layer, weight_quantizer)
        self.bn = bn
        self.bias_bits = bias_bits
        self.register_buffer("bn_frozen", torch.tensor(False))
        self.__dict__["input_quantizer"] = input_quantizer

    def extra_repr(self) -> str:
        return f"bn={'yes' if self.bn is not None else 'no'}"

    def folded_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """Weight and bias with BN folded by its running statistics (torch's fusion formula)."""
        if self.bn is None:
            return self.layer.weight, self.layer.bias
        return folded_weight_bias(self.layer, self.bn)

    @property
    def quantizing(self) -> bool:
        """Whether this forward fake-quantizes the weight (and bias)."""
        return bool(self.weight_quantizer.quant_enabled)

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None and self.training and not bool(self.bn_frozen):
            return self._forward_live_bn(x)
        return self._forward_folded(x)

    @property
    def fixed_exponent(self) -> bool:
        """Whether the weight keeps the exponent it holds (rule "calibrated")."""
        quantizer = self.weight_quantizer
        if isinstance(quantizer, WeightQuantizer):
            return not quantizer.follows_weight
        return getattr(self, "weight_rule", "minmax") == "calibrated"  # pickled before 0.3

    def weight_exponent_of(self, weight: Tensor) -> Tensor:
        """The exponent(s) a forward gives `weight` (before the bias rule may raise them)."""
        return self._weight_exponent(weight)

    def _weight_exponent(self, weight: Tensor) -> Tensor:
        quantizer = self.weight_quantizer
        if isinstance(quantizer, WeightQuantizer):
            return quantizer.exponent_for(weight)
        if self.fixed_exponent:  # a model pickled before 0.3: the layer held the rule
            return quantizer.exponent.clone()
        return weight_exponent(weight, quantizer.qmax, quantizer.axis,
                               getattr(self, "weight_rule", "minmax"))

    def _quantize_weight(self, weight: Tensor, exponent: Tensor) -> Tensor:
        quantizer = self.weight_quantizer
        if not self.training:
            return fake_quantize(weight, exponent, quantizer.qmin, quantizer.qmax, quantizer.axis)
        if not self.fixed_exponent:
            quantizer.exponent.copy_(exponent)  # a record of the last training step's exponent
        if isinstance(quantizer, WeightQuantizer):
            return quantizer.fake_quantize_training(weight, exponent)
        return fake_quantize_ste(weight, exponent, quantizer.qmin, quantizer.qmax,
                                 quantizer.axis, clip_gradient=False)  # pickled before 0.3

    def _forward_folded(self, x: Tensor) -> Tensor:
        weight, bias = self.folded_weight_bias()
        quantizer = self.input_quantizer
        if not self.quantizing:
            return layer_forward(self.layer, x, weight, bias)
        exponent = self._weight_exponent(weight)
        input_ready = quantizer is not None and bool(quantizer.quant_enabled) and quantizer.observed
        if bias is not None and input_ready:
            exponent = fit_bias_exponent(exponent, quantizer.exponent, bias, self.bias_bits)
            bias_exponent = quantizer.exponent + exponent
            bias = bias_to_grid(bias, bias_exponent, 0 if bias_exponent.dim() else None,
                                self.bias_bits)
        return layer_forward(self.layer, x, self._quantize_weight(weight, exponent), bias)

    def _forward_live_bn(self, x: Tensor) -> Tensor:
        bn = self.bn
        running_std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(running_std)
        # Detached: the forward is torch.ao's ConvBn; the gradient drops only the small term
        # d/dgamma of the weight's quantization error (BN's own affine still trains gamma), and
        # the output rescale becomes one multiply instead of a division with a reduction.
        scale = (gamma / running_std).detach()
        weight = self.layer.weight * scale.reshape(channel_shape(self.layer.weight.dim(), 0))
        if self.quantizing:
            weight = self._quantize_weight(weight, self._weight_exponent(weight))
        output = layer_forward(self.layer, x, weight, None)
        shape = channel_shape(output.dim(), 1 if output.dim() > 1 else 0)
        output = output * torch.reciprocal(scale).reshape(shape)
        if self.layer.bias is not None:
            output = output + self.layer.bias.reshape(shape)
        return bn(output)

    def freeze_bn(self) -> None:
        """Stop updating BN statistics; from now on train with the running ones, folded."""
        self.bn_frozen.fill_(True)

    def clip_weight_outliers(self, num_std: float) -> int:
        """One-time clip of folded weights beyond `num_std` standard deviations of their tensor
        (or channel, when per-channel) that are beyond `num_std` robust standard deviations of
        their own output channel too (`MIN_CHANNEL_WEIGHTS`): outliers, not channels that BN
        scaled up. Returns the count."""
        with torch.no_grad():
            folded, _ = self.folded_weight_bias()
            rows = folded.flatten(1) if folded.dim() > 1 else folded.reshape(1, -1)
            if rows.shape[1] < MIN_CHANNEL_WEIGHTS or self.fixed_exponent:
                return 0  # a calibrated exponent saturates outliers already
            raw = self.layer.weight
            fold_scale = folded / torch.where(raw == 0, torch.ones_like(raw), raw)
            if self.weight_quantizer.axis is None:
                limit = num_std * _sigma_clipped_std(folded.reshape(1, -1), num_std)
            else:
                limit = num_std * _sigma_clipped_std(folded.flatten(1), num_std)
                limit = limit.reshape(channel_shape(folded.dim(), 0))
            outliers = folded.abs() > limit
            deviation = (rows - rows.median(dim=1, keepdim=True).values).abs()
            own = num_std * 1.4826 * deviation.median(dim=1, keepdim=True).values
            outliers &= (rows.abs() > own).reshape(folded.shape)
            count = int(outliers.sum())
            if not count:
                return 0
            clipped = torch.maximum(torch.minimum(folded, limit), -limit) / fold_scale
            raw.copy_(torch.where(outliers, clipped, raw))
            return count

    def to_fake_quant_layer(self) -> FakeQuantLayer:
        """The BN-folded layer as a PTC `FakeQuantLayer`, its weight quantizer frozen at the
        exponent of the folded weight that the eval forward uses, for convert."""
        weight, bias = self.folded_weight_bias()
        folded = copy.deepcopy(self.layer)
        folded.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if bias is not None:
            folded.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        quantizer = copy.deepcopy(self.weight_quantizer)
        quantizer.exponent.copy_(self._weight_exponent(folded.weight))
        quantizer.set_mode(observe=False, quantize=True)
        return FakeQuantLayer(folded.eval(), quantizer)
