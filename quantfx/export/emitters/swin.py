"""torchvision Swin's `@torch.fx.wrap` functions, written out in float at the export shapes:
`_patch_merging_pad` and `shifted_window_attention` (v1, and v2's cosine attention)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from quantfx.errors import ExportError
from quantfx.export.builder import END, Builder


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
    b.add("Concat", phases, [node.name], node.name, axis=rank - 1)
    b.env[node] = node.name


def _swin_attention_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int]
                         ) -> Tensor:
    """The shifted-window mask of torchvision's `shifted_window_attention`, (nW, N, N)."""
    mask = torch.zeros(pad_h, pad_w)
    count = 0
    for rows in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for columns in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            mask[rows[0]:rows[1], columns[0]:columns[1]] = count
            count += 1
    windows = (pad_h // window[0]) * (pad_w // window[1])
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


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
    window, heads = list(arguments["window_size"]), int(arguments["num_heads"])
    shift = list(arguments["shift_size"])
    head_dim = channels // heads
    pad_r = (window[1] - width % window[1]) % window[1]
    pad_b = (window[0] - height % window[0]) % window[0]
    source, padded = b.pad_end(f"{name}.pad", b.tensor_input(node),
                              (batch, height, width, channels), {1: pad_b, 2: pad_r})
    pad_h, pad_w = padded[1], padded[2]
    if window[0] >= pad_h:
        shift[0] = 0
    if window[1] >= pad_w:
        shift[1] = 0
    shifted = sum(shift) > 0
    if shifted:
        source = b.roll(f"{name}.roll", source, padded, [-shift[0], -shift[1]], [1, 2])
    rows, columns = pad_h // window[0], pad_w // window[1]
    windows, tokens = rows * columns, window[0] * window[1]
    b.reshape(f"{name}.grid", source, f"{name}.grid",
              (batch, rows, window[0], columns, window[1], channels))
    b.add("Transpose", [f"{name}.grid"], [f"{name}.windowed"], f"{name}.windowed",
          perm=[0, 1, 3, 2, 4, 5])
    b.reshape(f"{name}.windows", f"{name}.windowed", f"{name}.windows",
              (batch * windows, tokens, channels))
    qkv_weight = b.constant_tensor(node, arguments["qkv_weight"], "qkv_weight")
    qkv_bias = b.constant_tensor(node, arguments["qkv_bias"], "qkv_bias")
    logit_scale = b.constant_tensor(node, arguments["logit_scale"], "logit_scale")
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        qkv_bias[channels:2 * channels] = 0
    qkv = b.float_linear(f"{name}.qkv", f"{name}.windows", qkv_weight, qkv_bias)
    b.reshape(f"{name}.qkv_heads", qkv, f"{name}.qkv_heads",
              (batch * windows, tokens, 3, heads, head_dim))
    b.add("Transpose", [f"{name}.qkv_heads"], [f"{name}.qkv_split"], f"{name}.qkv_split",
          perm=[2, 0, 3, 1, 4])
    parts = {}
    for index, role in enumerate(("query", "key", "value")):
        piece = b.slice(f"{name}.{role}_slice", f"{name}.qkv_split", [index], [index + 1],
                       [0])
        b.reshape(f"{name}.{role}", piece, f"{name}.{role}",
                  (batch * windows, heads, tokens, head_dim))
        parts[role] = f"{name}.{role}"
    query, key = parts["query"], parts["key"]
    if logit_scale is not None:  # cosine attention: F.normalize, then a learned scale
        for role in ("query", "key"):
            norm = f"{name}.{role}_norm"
            b.reduce("ReduceL2", parts[role], norm, [-1])
            b.add("Max", [norm, b.float_constant(f"{norm}.eps", 1e-12)], [f"{norm}.safe"],
                  f"{norm}.safe")
            b.add("Div", [parts[role], f"{norm}.safe"], [f"{name}.{role}_unit"],
                  f"{name}.{role}_unit")
        query, key = f"{name}.query_unit", f"{name}.key_unit"
        scale_value = torch.clamp(logit_scale, max=math.log(100.0)).exp().numpy()
    else:
        b.add("Mul", [query, b.float_constant(f"{name}.scale", head_dim ** -0.5)],
              [f"{name}.query_scaled"], f"{name}.query_scaled")
        query = f"{name}.query_scaled"
    b.add("Transpose", [key], [f"{name}.key_t"], f"{name}.key_t", perm=[0, 1, 3, 2])
    b.add("MatMul", [query, f"{name}.key_t"], [f"{name}.scores"], f"{name}.scores")
    scores = f"{name}.scores"
    if logit_scale is not None:
        b.add("Mul", [scores, b.float_constant(f"{name}.logit_scale", scale_value)],
              [f"{name}.scores_scaled"], f"{name}.scores_scaled")
        scores = f"{name}.scores_scaled"
    b.add("Add", [scores, b.value(arguments["relative_position_bias"])],
          [f"{name}.scores_biased"], f"{name}.scores_biased")
    scores = f"{name}.scores_biased"
    if shifted:
        mask = _swin_attention_mask(pad_h, pad_w, window, shift)
        b.reshape(f"{name}.scores_windows", scores, f"{name}.scores_windows",
                  (batch, windows, heads, tokens, tokens))
        b.add("Add", [f"{name}.scores_windows", b.float_constant(
            f"{name}.mask", mask.reshape(1, windows, 1, tokens, tokens).numpy())],
              [f"{name}.scores_masked"], f"{name}.scores_masked")
        b.reshape(f"{name}.scores_flat", f"{name}.scores_masked", f"{name}.scores_flat",
                  (batch * windows, heads, tokens, tokens))
        scores = f"{name}.scores_flat"
    b.add("Softmax", [scores], [f"{name}.probabilities"], f"{name}.probabilities", axis=-1)
    b.add("MatMul", [f"{name}.probabilities", parts["value"]], [f"{name}.context"],
          f"{name}.context")
    b.add("Transpose", [f"{name}.context"], [f"{name}.context_t"], f"{name}.context_t",
          perm=[0, 2, 1, 3])
    b.reshape(f"{name}.merged", f"{name}.context_t", f"{name}.merged",
              (batch * windows, tokens, channels))
    proj_weight = b.constant_tensor(node, arguments["proj_weight"], "proj_weight")
    proj_bias = b.constant_tensor(node, arguments["proj_bias"], "proj_bias")
    projected = b.float_linear(f"{name}.projected", f"{name}.merged", proj_weight, proj_bias)
    b.reshape(f"{name}.ungrid", projected, f"{name}.ungrid",
              (batch, rows, columns, window[0], window[1], channels))
    b.add("Transpose", [f"{name}.ungrid"], [f"{name}.unwindowed"], f"{name}.unwindowed",
          perm=[0, 1, 3, 2, 4, 5])
    b.reshape(f"{name}.image", f"{name}.unwindowed", f"{name}.image",
              (batch, pad_h, pad_w, channels))
    result = f"{name}.image"
    if shifted:
        result = b.roll(f"{name}.unroll", result, padded, shift, [1, 2])
    if pad_b or pad_r:
        result = b.slice(f"{name}.crop", result, [0, 0], [height, width], [1, 2])
    b.add("Identity", [result], [name], name)
    b.env[node] = name
