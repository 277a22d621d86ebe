"""Modules that stand in for functionals and tensor ops, so each call site owns its quantizer.

They compute exactly what the functional they replace computes; the graph rewrite in
`quantfx.passes.normalize` puts one instance at every call site.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ONE_SIXTH = 0.1666666716337204
"""1/6 rounded to float32: the `alpha` ONNX HardSigmoid / HardSwish multiply by."""


def hard_sigmoid(x: Tensor) -> Tensor:
    """``clamp(x * alpha + 0.5, 0, 1)`` with alpha = float32(1/6), in ONNX's float steps."""
    return torch.clamp(x * ONE_SIXTH + 0.5, 0.0, 1.0)


class HardSigmoid(nn.Module):
    """torch's hardsigmoid in the float steps of ONNX HardSigmoid, so the exported single op
    computes exactly what this computes."""

    def forward(self, x: Tensor) -> Tensor:
        return hard_sigmoid(x)


class HardSwish(nn.Module):
    """``x * hard_sigmoid(x)``: torch's hardswish in the float steps of ONNX HardSwish."""

    def forward(self, x: Tensor) -> Tensor:
        return x * hard_sigmoid(x)


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


class Reduction(nn.Module):
    """A reduction over `dim` (all dims when None), keeping them as size 1 with `keepdim`."""

    def __init__(self, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> None:
        super().__init__()
        self.dim = tuple(dim) if isinstance(dim, (list, tuple)) else dim
        self.keepdim = keepdim

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}"


class Mean(Reduction):
    """Mean over `dim` (e.g. the spatial dimensions: a global average pool)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.dim is None:
            return torch.mean(x)
        return torch.mean(x, dim=self.dim, keepdim=self.keepdim)


class Sum(Reduction):
    """Sum over `dim` (TIDL's ReduceSum; unlike a mean, no BatchNorm folds forward across it)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.dim is None:
            return torch.sum(x)
        return torch.sum(x, dim=self.dim, keepdim=self.keepdim)


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


class AdditiveMask(nn.Module):
    """Masked attention scores: -inf where `mask` is set (torchvision Swin adds -100 there).
    The quantizer after it saturates those to its lowest code without counting them in its
    range, exactly what the exported Add of a -32768 constant followed by Q/DQ computes."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.bool())

    def forward(self, x: Tensor) -> Tensor:
        return x.masked_fill(self.mask, float("-inf"))


class Pad(nn.Module):
    """`F.pad` that only moves values: zero, reflect, replicate or circular padding. Zero is on
    every grid, so the output keeps its input's quantizer (a shape-only op)."""

    def __init__(self, pad: tuple[int, ...], mode: str = "constant") -> None:
        super().__init__()
        self.pad = tuple(int(p) for p in pad)
        self.mode = mode

    def extra_repr(self) -> str:
        return f"pad={self.pad}, mode={self.mode!r}"

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.pad, mode=self.mode)


class ConstantPad(nn.Module):
    """Constant padding with a non-zero value, which need not lie on the input's grid: its
    output gets a quantizer of its own."""

    def __init__(self, pad: tuple[int, ...], value: float) -> None:
        super().__init__()
        self.pad = tuple(int(p) for p in pad)
        self.mode = "constant"
        self.value = float(value)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, value={self.value}"

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.pad, mode="constant", value=self.value)


MOVED = {"BatchNormLayer": "quantfx.layers", "batchnorm_affine": "quantfx.layers"}
"""Names that lived here once: a whole model pickled (torch.save) before they moved names
them here, and unpickling looks them up here."""


def __getattr__(name: str) -> Any:
    if name in MOVED:  # looked up at unpickling only: no import of a higher floor at load
        return getattr(importlib.import_module(MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
