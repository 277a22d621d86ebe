"""torchvision Swin's `@torch.fx.wrap` functions, written out in float at the export shapes:
`_patch_merging_pad` and `shifted_window_attention` (v1, and v2's cosine attention)."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from quantfx.errors import ExportError
from quantfx.export.builder import END, Builder
from quantfx.export.emitters.attention import attend
from quantfx.passes.window_attention import shifted_window_mask


def emit_patch_merging_pad(b: Builder, node: fx.Node, module: Any) -> None:
    """torchvision Swin's `_patch_merging_pad`: pad H, W to even, then the four 2x2
    phases side by side on the channel axis."""
    shape = b.input_info(node).shape
    rank = len(shape)
    height, width = rank - 3, rank - 2
    source, _ = b.pad_end(f"{node.name}.pad", b.tensor_input(node), shape,
                         {height: shape[height] % 2, width: shape[width] % 2})
    phases = [b.slice(f"{node.name}.phase{index}", source, [row, column], [END, END],
                     [height, width], [2, 2])
              for index, (row, column) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1)))]
    b.op("Concat", phases, node.name, axis=rank - 1)
    b.env[node] = node.name


def _swin_attention_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int]
                         ) -> Tensor:
    """The shifted-window mask of torchvision's `shifted_window_attention`, (nW, N, N)."""
    return shifted_window_mask(pad_h, pad_w, window, shift).float() * -100.0


@dataclass
class _Windows:
    """The export shapes of one `shifted_window_attention` call."""

    batch: int
    height: int
    width: int
    channels: int
    heads: int
    window: list[int]
    shift: list[int]
    padded: tuple[int, ...]

    @property
    def grid(self) -> tuple[int, int]:
        return self.padded[1] // self.window[0], self.padded[2] // self.window[1]

    @property
    def count(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens(self) -> int:
        return self.window[0] * self.window[1]


def emit_shifted_window_attention(b: Builder, node: fx.Node, module: Any) -> None:
    """torchvision Swin's `shifted_window_attention` (v1, and v2's cosine attention) in float
    at the export shapes: pad, roll, window partition, attention with relative position bias
    and shift mask, window merge, roll back, crop; the mask and logit scale are constants."""
    bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    if arguments["training"]:
        raise ExportError(f"'{node.name}': export the model in eval mode (training=True).")
    name = node.name
    batch, height, width, channels = b.input_info(node).shape
    window, shift = list(arguments["window_size"]), list(arguments["shift_size"])
    pad_r = (window[1] - width % window[1]) % window[1]
    pad_b = (window[0] - height % window[0]) % window[0]
    source, padded = b.pad_end(f"{name}.pad", b.tensor_input(node),
                              (batch, height, width, channels), {1: pad_b, 2: pad_r})
    shift = [0 if window[axis] >= padded[axis + 1] else shift[axis] for axis in (0, 1)]
    shape = _Windows(batch, height, width, channels, int(arguments["num_heads"]), window,
                     shift, padded)
    if sum(shift) > 0:
        source = b.roll(f"{name}.roll", source, padded, [-shift[0], -shift[1]], [1, 2])
    rows, columns = shape.grid
    b.reshape(f"{name}.grid", source, f"{name}.grid",
              (batch, rows, window[0], columns, window[1], channels))
    windowed = b.op("Transpose", [f"{name}.grid"], f"{name}.windowed", perm=[0, 1, 3, 2, 4, 5])
    b.reshape(f"{name}.windows", windowed, f"{name}.windows",
              (batch * shape.count, shape.tokens, channels))
    context = _window_attention(b, node, arguments, shape, f"{name}.windows")
    _merge_windows(b, node, arguments, shape, context)


def _window_attention(b: Builder, node: fx.Node, arguments: dict, shape: _Windows,
                      windows: str) -> str:
    """Attention inside each window: qkv projection, (cosine) scores plus the relative position
    bias and the shift mask, softmax, weighted values; returns the context per head."""
    name, channels, heads = node.name, shape.channels, shape.heads
    qkv_weight = b.constant_tensor(node, arguments["qkv_weight"], "qkv_weight")
    qkv_bias = b.constant_tensor(node, arguments["qkv_bias"], "qkv_bias")
    logit_scale = b.constant_tensor(node, arguments["logit_scale"], "logit_scale")
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        qkv_bias[channels:2 * channels] = 0
    qkv = b.float_linear(f"{name}.qkv", windows, qkv_weight, qkv_bias)
    rows = shape.batch * shape.count
    b.reshape(f"{name}.qkv_heads", qkv, f"{name}.qkv_heads",
              (rows, shape.tokens, 3, heads, channels // heads))
    split = b.op("Transpose", [f"{name}.qkv_heads"], f"{name}.qkv_split", perm=[2, 0, 3, 1, 4])
    parts = {}
    for index, role in enumerate(("query", "key", "value")):
        piece = b.slice(f"{name}.{role}_slice", split, [index], [index + 1], [0])
        b.reshape(f"{name}.{role}", piece, f"{name}.{role}",
                  (rows, heads, shape.tokens, channels // heads))
        parts[role] = f"{name}.{role}"
    if logit_scale is not None:  # cosine attention: F.normalize, then a learned scale
        query, key = (_unit_length(b, f"{name}.{role}", parts[role]) for role in ("query", "key"))
    else:
        query = b.op("Mul", [parts["query"], b.float_constant(
            f"{name}.scale", (channels // heads) ** -0.5)], f"{name}.query_scaled")
        key = parts["key"]
    key_t = b.op("Transpose", [key], f"{name}.key_t", perm=[0, 1, 3, 2])
    scores = b.op("MatMul", [query, key_t], f"{name}.scores")
    if logit_scale is not None:
        scale_value = torch.clamp(logit_scale, max=math.log(100.0)).exp().numpy()
        scores = b.op("Mul", [scores, b.float_constant(f"{name}.logit_scale", scale_value)],
                      f"{name}.scores_scaled")
    scores = b.op("Add", [scores, b.value(arguments["relative_position_bias"])],
                  f"{name}.scores_biased")
    if sum(shape.shift) > 0:
        scores = _shift_masked(b, name, scores, shape)
    return attend(b, name, scores, parts["value"])


def _unit_length(b: Builder, name: str, source: str) -> str:
    """F.normalize over the last axis (eps 1e-12)."""
    norm = f"{name}_norm"
    b.reduce("ReduceL2", source, norm, [-1])
    safe = b.op("Max", [norm, b.float_constant(f"{norm}.eps", 1e-12)], f"{norm}.safe")
    return b.op("Div", [source, safe], f"{name}_unit")


def _shift_masked(b: Builder, name: str, scores: str, shape: _Windows) -> str:
    """The scores plus the shifted-window mask (-100 between tokens of different regions)."""
    windows, tokens = shape.count, shape.tokens
    mask = _swin_attention_mask(shape.padded[1], shape.padded[2], shape.window, shape.shift)
    b.reshape(f"{name}.scores_windows", scores, f"{name}.scores_windows",
              (shape.batch, windows, shape.heads, tokens, tokens))
    masked = b.op("Add", [f"{name}.scores_windows", b.float_constant(
        f"{name}.mask", mask.reshape(1, windows, 1, tokens, tokens).numpy())],
        f"{name}.scores_masked")
    b.reshape(f"{name}.scores_flat", masked, f"{name}.scores_flat",
              (shape.batch * windows, shape.heads, tokens, tokens))
    return f"{name}.scores_flat"


def _merge_windows(b: Builder, node: fx.Node, arguments: dict, shape: _Windows,
                   context: str) -> None:
    """Heads merged, output projection, windows back into the image, roll back, crop."""
    name, channels = node.name, shape.channels
    (rows, columns), padded = shape.grid, shape.padded
    context_t = b.op("Transpose", [context], f"{name}.context_t", perm=[0, 2, 1, 3])
    b.reshape(f"{name}.merged", context_t, f"{name}.merged",
              (shape.batch * shape.count, shape.tokens, channels))
    proj_weight = b.constant_tensor(node, arguments["proj_weight"], "proj_weight")
    proj_bias = b.constant_tensor(node, arguments["proj_bias"], "proj_bias")
    projected = b.float_linear(f"{name}.projected", f"{name}.merged", proj_weight, proj_bias)
    b.reshape(f"{name}.ungrid", projected, f"{name}.ungrid",
              (shape.batch, rows, columns, shape.window[0], shape.window[1], channels))
    unwindowed = b.op("Transpose", [f"{name}.ungrid"], f"{name}.unwindowed",
                      perm=[0, 1, 3, 2, 4, 5])
    b.reshape(f"{name}.image", unwindowed, f"{name}.image",
              (shape.batch, padded[1], padded[2], channels))
    result = f"{name}.image"
    if sum(shape.shift) > 0:
        result = b.roll(f"{name}.unroll", result, padded, shape.shift, [1, 2])
    if padded[1] != shape.height or padded[2] != shape.width:
        result = b.slice(f"{name}.crop", result, [0, 0], [shape.height, shape.width], [1, 2])
    b.env[node] = b.op("Identity", [result], name)
