"""What each op *is*, in one place: plain tables that placement, QAT, convert and export read.

Data only, no logic. An op's row here decides where quantizers go (shape-only ops keep their
input's grid, fusable activations run inside the layer before them), how it exports (identity,
reshape) and what the verifier says about it (float-rounding ops). Adding a shape-only op is one
entry here plus one emitter in `quantfx.export.emitters`; a test checks that every shape-only op
has an emitter.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantfx import modules as standins

try:  # torchvision's stochastic depth: identity in eval, kept whole by the tracer
    from torchvision.ops import StochasticDepth

    OPTIONAL_IDENTITY_MODULES: tuple[type[nn.Module], ...] = (StochasticDepth,)
except ImportError:  # pragma: no cover - torchvision is a dependency
    OPTIONAL_IDENTITY_MODULES = ()

DEFAULT_LEAF_MODULES: tuple[type[nn.Module], ...] = OPTIONAL_IDENTITY_MODULES
"""Modules the tracer never enters: they hide randomness behind `self.training`."""

# ------------------------------------------------------------------------------- weight layers

TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHT_LAYERS = CONVS + (nn.Linear,) + TRANSPOSED_CONVS
"""Layers whose weights quantfx quantizes (BatchNorm already folded into them)."""
FOLDABLE_LAYERS = CONVS + (nn.Linear,)
"""Layers a following BatchNorm always folds into (a transposed conv only when ungrouped)."""
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
UNQUANTIZED_PARAMETER_MODULES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
"""Modules with parameters that quantfx runs as they are, without a warning."""

# ---------------------------------------------------------------------------- fusion, signs

FUSABLE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
"""Clipping activations an engine executes inside the preceding layer."""
FUSE_PRODUCERS = WEIGHT_LAYERS + BATCHNORMS + (standins.Add,)
"""Ops (or the layers wrapping them) whose output is not quantized when their only user is a
fusable activation."""
NONNEGATIVE_OUTPUT_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, standins.HardSigmoid,
                              nn.Softmax)
"""Modules whose output is non-negative whatever their input."""
ORDER_PRESERVING_MODULES = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    standins.Mean, standins.Sum, standins.Cat, standins.Stack, standins.Add, standins.Mul,
)
"""Modules whose output is non-negative when all their tensor inputs are (quantizers too)."""
MONOTONE_RESIZE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area")
"""Resize modes that never leave the range of their input (bicubic overshoots)."""

# ------------------------------------------------------------------------- shape-only ops

IDENTITY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.modules.dropout._DropoutNd) + OPTIONAL_IDENTITY_MODULES
"""Modules that return their input unchanged in eval mode (exported as no node at all)."""
IDENTITY_CALLS: set[Any] = {"contiguous", "clone", "detach", torch.clone}
"""Functions and Tensor methods that return their input's values unchanged."""
DROPOUT_FUNCTIONS: set[Any] = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
"""Identity when called with training=False (as traced in eval mode)."""
RESHAPE_CALLS: set[Any] = {
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "unflatten",
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
}
"""Calls that only change the shape (exported as Reshape to the recorded static shape)."""

SHAPE_ONLY_MODULES: tuple[type[nn.Module], ...] = IDENTITY_MODULES + (
    nn.Flatten, nn.Unflatten,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, standins.Pad,
)
"""Modules that only move, select or copy values: their output is on their input's grid."""
SHAPE_ONLY_FUNCTIONS: set[Callable] = {
    operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose,
    torch.swapaxes, torch.swapdims, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
    torch.narrow, torch.flip, torch.roll, torch.t, torch.unbind, torch.movedim, torch.clone,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.pixel_shuffle, F.pixel_unshuffle,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.channel_shuffle,
}
SHAPE_ONLY_METHODS: set[str] = {
    "view", "reshape", "flatten", "permute", "transpose", "swapaxes", "swapdims", "contiguous",
    "squeeze", "unsqueeze", "expand", "expand_as", "chunk", "split", "unbind", "narrow",
    "repeat", "t", "flip", "roll", "clone", "detach", "view_as", "reshape_as", "movedim",
    "unflatten", "__getitem__",
}

# ------------------------------------------------------------------------------ float ops

FLOAT_ROUNDING_MODULES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.MultiheadAttention, nn.GELU, nn.Softmax, nn.Sigmoid, nn.Tanh, nn.SiLU,
    nn.modules.batchnorm._BatchNorm,
)
"""Modules exported as float math whose rounding ONNX Runtime need not reproduce exactly."""

# ------------------------------------------------------------------- what ops commute with

POSITIVE_HOMOGENEOUS = (nn.ReLU, nn.PReLU, nn.LeakyReLU)
"""Activations f with f(x / s) = f(x) / s for s > 0, per channel (PReLU's slope is a channel's
own, so it commutes with that channel's scale)."""
SCALE_COMMUTING = (nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                   nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
"""Channel-wise ops that commute with a positive per-channel scale (max and mean of scaled
values are the scaled max and mean): equalization looks through them."""
FOLD_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d)
"""Ops a per-channel affine passes through unchanged (eval-mode no-ops, averages over space):
a BatchNorm folds forward across them."""
FOLD_THROUGH_IF_POSITIVE = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d,
                            nn.AdaptiveMaxPool2d)
"""Ops an affine with a positive scale passes through (the max of a * x + b is a * max + b)."""

# ------------------------------------------------------------------------- op kinds

BOUNDED_ACTIVATIONS = (nn.ReLU6, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Softmax)
"""Activations whose output range is fixed by the op (the doctor does not call their tails
long)."""
MATMULS = {torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm"}
"""Calls that multiply two activations (TIDL's MatMul)."""
