"""The weight layers of the three model stages, and how a conv/linear runs on given weights.

- `FakeQuantLayer` (prepared, PTC): the float layer, its weight rounded through a weight
  quantizer on every forward; its bias stays float until `convert`.
- `quantfx.qat.QATLayer` (prepared, QAT; a `FakeQuantLayer`): also folds BatchNorm on the fly.
- `IntegerLayer` (converted): the integers the engine stores (int8/int16 weights, int32 bias)
  and the layer run on their exact float values.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantfx.errors import LoadError
from quantfx.ops import TRANSPOSED_CONVS
from quantfx.qmath import fit_bias_exponent, from_codes, qrange, to_codes

_TRANSPOSED_FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def is_depthwise(layer: nn.Module) -> bool:
    """A convolution where every input channel has its own filter group."""
    return (
        isinstance(layer, nn.modules.conv._ConvNd)
        and not layer.transposed
        and layer.groups > 1
        and layer.groups == layer.in_channels
    )


def layer_forward(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Run a conv or linear `layer` on `x` with the given weight and bias."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, TRANSPOSED_CONVS):
        return _TRANSPOSED_FUNCTIONS[len(layer.kernel_size)](
            x, weight, bias, layer.stride, layer.padding, layer.output_padding, layer.groups,
            layer.dilation)
    return layer._conv_forward(x, weight, bias)


def keep_bias_free(layer: nn.Module) -> nn.Module:
    """Mark `layer` to stay without a bias through calibration's bias corrections (Swin V2's
    key: a padded token's key must stay exactly zero, F.normalize makes a tiny one a unit
    vector)."""
    layer.bias_free = True
    return layer


def takes_bias_corrections(layer: nn.Module) -> bool:
    """Whether calibration may give `layer` a bias or shift the one it has."""
    return not getattr(layer, "bias_free", False)


def with_bias(layer: nn.Module) -> nn.Module:
    """`layer` with a zero bias if it had none (bias calibration needs one to correct)."""
    if layer.bias is None and takes_bias_corrections(layer):
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        layer.bias = nn.Parameter(torch.zeros(channels, dtype=layer.weight.dtype,
                                              device=layer.weight.device),
                                  requires_grad=layer.weight.requires_grad)
    return layer


class FakeQuantLayer(nn.Module):
    """A conv/linear layer whose weight goes through `weight_quantizer` on every forward.

    The bias stays float here; `convert` puts it on the int32 grid of input scale x weight
    scale, which is negligible next to the weight's rounding during calibration.
    """

    def __init__(self, layer: nn.Module, weight_quantizer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.weight_quantizer = weight_quantizer
        self.register_buffer("float_bias", None if layer.bias is None
                             else layer.bias.detach().clone())
        """The bias before bias calibration: every calibration starts again from it."""
        self.register_buffer("float_weight", None)
        """The float weight before learned rounding set it on the grid (None until then; in
        `state_dict` once set, so a reloaded model calibrates again from the float weights)."""
        self.weight_cache: list[Any] | None = None
        """While a list (bias calibration), [key, quantized weight]: weights and exponents are
        fixed there, and a large model spends most of its time re-quantizing them."""

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        """A state_dict with learned rounding's float weights brings them along; one without
        them holds float weights itself, so none are kept."""
        saved = state_dict.get(prefix + "float_weight")
        self.float_weight = None if saved is None else torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.layer.weight
        if self.weight_cache is None or torch.is_grad_enabled():
            weight = self.weight_quantizer(weight)
        else:
            key = (weight.data_ptr(), weight._version,
                   *(tensor._version for tensor in self.weight_quantizer.buffers()))
            if not self.weight_cache or self.weight_cache[0] != key:
                self.weight_cache[:] = [key, self.weight_quantizer(weight)]
            weight = self.weight_cache[1]
        return layer_forward(self.layer, x, weight, self.layer.bias)


class IntegerLayer(nn.Module):
    """A conv/linear layer with integer weights and int32 bias, run on the grid values.

    Buffers hold what the engine stores: `weight_int` (int8/int16 codes), `weight_exponent`
    (one per output channel for depthwise), `bias_int` (int32 codes at `bias_exponent` =
    input exponent + weight exponent) and `input_exponent`.
    """

    def __init__(self, layer: nn.Module, weight_quantizer: nn.Module, input_exponent: Tensor,
                 bias_bits: int = 32) -> None:
        super().__init__()
        self.weight_bits = weight_quantizer.bits
        self.axis = weight_quantizer.axis
        self.bias_bits = bias_bits
        """The width the engine keeps the bias in (its codes are stored as int32 either way)."""
        weight = layer.weight.detach()
        weight_exponent = fit_bias_exponent(
            weight_quantizer.exponent.detach().clone(), input_exponent.detach(), layer.bias,
            bias_bits)
        weight_int = to_codes(
            weight, weight_exponent, weight_quantizer.qmin, weight_quantizer.qmax, self.axis
        )
        bias_exponent = input_exponent.detach() + weight_exponent
        self.register_buffer("input_exponent", input_exponent.detach().clone())
        self.register_buffer("weight_exponent", weight_exponent)
        self.register_buffer("bias_exponent", bias_exponent)
        int_type = torch.int8 if self.weight_bits == 8 else torch.int16
        self.register_buffer("weight_int", weight_int.to(int_type))
        self.layer = copy.deepcopy(layer)
        self.layer.weight = nn.Parameter(
            from_codes(weight_int, weight_exponent, self.axis), requires_grad=False
        )
        if layer.bias is not None:
            bias_axis = 0 if bias_exponent.dim() else None
            bias_int = to_codes(layer.bias.detach(), bias_exponent,
                                *qrange(bias_bits, signed=True), bias_axis)
            self.register_buffer("bias_int", bias_int.to(torch.int32))
            self.layer.bias = nn.Parameter(from_codes(bias_int, bias_exponent, bias_axis),
                                           requires_grad=False)
        else:
            self.register_buffer("bias_int", None)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        """Refuse codes of another width: copying int16 codes into int8 buffers would
        truncate them silently (a 16-bit model's state_dict into an 8-bit conversion)."""
        codes = state_dict.get(prefix + "weight_int")
        if codes is not None and codes.dtype != self.weight_int.dtype:
            raise LoadError(
                f"the state_dict holds {codes.dtype} weight codes for layer "
                f"'{prefix.rstrip('.')}', whose converted weights are {self.weight_int.dtype}: it "
                "comes from a model quantized with other bit widths. Convert with the same "
                "QuantConfig (weight_bits, sixteen_bit_layers) before loading.")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class PReLULayer(nn.Module):
    """A PReLU whose slopes run through a weight quantizer, as TIDL runs PReLU: its slopes
    symmetric and per tensor, like the weights of its BatchNorm layer (TIDL_FACTS.md). The
    slope stays this module's `weight`, so a float model's state_dict keys still load."""

    def __init__(self, prelu: nn.PReLU, weight_quantizer: nn.Module) -> None:
        super().__init__()
        self.weight = prelu.weight
        self.weight_quantizer = weight_quantizer

    def slope(self) -> Tensor:
        """The slopes as the engine holds them (float while the quantizer only observes)."""
        return self.weight_quantizer(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.prelu(x, self.slope())


def batchnorm_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """A BatchNorm's eval-mode function (running statistics) as a per-channel scale and
    shift, detached: `bn(x) == x * scale + shift` along the channel axis."""
    scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    shift = -bn.running_mean.detach() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    return scale, shift


class BatchNormLayer(nn.Conv2d):
    """A BatchNorm (1-D, 2-D or 3-D) that cannot fold into a conv or linear (after a ReLU,
    after an add, on the input), as the per-channel affine ``x * scale + shift`` the engine
    runs. In form a depthwise 1x1 conv, so its parameters are quantized like a layer's (TIDL: a
    per-tensor symmetric weight; an int32 bias at input x weight scale) and bias calibration
    corrects it; it runs on inputs of any rank (channels on axis 1) and exports as ONNX
    BatchNormalization, not as a conv."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 1, groups=channels, bias=True)

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The affine on a 4-D input as the 1x1 conv it is; on any other rank the same
        product and sum (exact products of grid values: one rounding in the sum, as the
        conv's)."""
        if x.dim() == 4:
            return super()._conv_forward(x, weight, bias)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        output = x * weight.reshape(shape)
        return output if bias is None else output + bias.reshape(shape)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> BatchNormLayer:
        """The same function as `bn` in eval mode (its running statistics)."""
        layer = cls(bn.num_features).to(bn.running_mean.device)
        scale, shift = batchnorm_affine(bn)
        with torch.no_grad():
            layer.weight.copy_(scale.reshape(-1, 1, 1, 1))
            layer.bias.copy_(shift)
        return layer
