"""Modules that stand in for functionals and tensor ops, so each call site owns its quantizer.

They compute exactly what the functional they replace computes; the graph rewrite in
`quantfx.passes.normalize` puts one instance at every call site.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Add(nn.Module):
    """Elementwise ``a + b`` (either may be a number)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class Sub(nn.Module):
    """Elementwise ``a - b`` (either may be a number)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a - b


class Mul(nn.Module):
    """Elementwise ``a * b`` (either may be a number)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a * b


class Cat(nn.Module):
    """Concatenation of its inputs along `dim`."""

    def __init__(self, dim: int = 0) -> None:
        super().__init__()
        self.dim = dim

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def forward(self, *tensors: Tensor) -> Tensor:
        return torch.cat(tensors, dim=self.dim)


class Stack(Cat):
    """Stack of its inputs along a new `dim`."""

    def forward(self, *tensors: Tensor) -> Tensor:
        return torch.stack(tensors, dim=self.dim)


class Mean(nn.Module):
    """Mean over `dim` (e.g. the spatial dimensions: a global average pool)."""

    def __init__(self, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> None:
        super().__init__()
        self.dim = tuple(dim) if isinstance(dim, (list, tuple)) else dim
        self.keepdim = keepdim

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}"

    def forward(self, x: Tensor) -> Tensor:
        if self.dim is None:
            return torch.mean(x)
        return torch.mean(x, dim=self.dim, keepdim=self.keepdim)


class Interpolate(nn.Module):
    """`F.interpolate` with its options fixed; `size` may still be given per call."""

    def __init__(
        self,
        size: int | tuple[int, ...] | None = None,
        scale_factor: float | tuple[float, ...] | None = None,
        mode: str = "nearest",
        align_corners: bool | None = None,
        recompute_scale_factor: bool | None = None,
        antialias: bool = False,
    ) -> None:
        super().__init__()
        self.size = size
        self.scale_factor = scale_factor
        self.mode = mode
        self.align_corners = align_corners
        self.recompute_scale_factor = recompute_scale_factor
        self.antialias = antialias

    def extra_repr(self) -> str:
        return f"size={self.size}, scale_factor={self.scale_factor}, mode={self.mode!r}"

    def forward(self, x: Tensor, size: int | tuple[int, ...] | None = None) -> Tensor:
        size = self.size if size is None else size
        return F.interpolate(
            x,
            size=size,
            scale_factor=None if size is not None else self.scale_factor,
            mode=self.mode,
            align_corners=self.align_corners,
            recompute_scale_factor=self.recompute_scale_factor,
            antialias=self.antialias,
        )


TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) + TRANSPOSED_CONVS
"""Layers whose weights quantfx quantizes (BatchNorm already folded into them)."""

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


class QuantLayer(nn.Module):
    """A conv/linear layer whose weight goes through `weight_quantizer` on every forward.

    The bias stays float here; `convert` puts it on the int32 grid of input scale x weight
    scale, which is negligible next to the weight's rounding during calibration.
    """

    def __init__(self, layer: nn.Module, weight_quantizer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.weight_quantizer = weight_quantizer
        self.weight_cache: list[Any] | None = None
        """While a list (bias calibration), [key, quantized weight]: weights and exponents are
        fixed there, and a large model spends most of its time re-quantizing them."""

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
