"""torchvision Swin's shifted-window attention in the pieces TIDL runs, so each can be quantized.

torchvision computes a Swin block's attention in `shifted_window_attention`, a `@torch.fx.wrap`
function that tracing keeps whole (float weights, float scores). This pass replaces each call
made by a `ShiftedWindowAttention` module (Swin V1) or `ShiftedWindowAttentionV2` by
`WindowAttentionPieces`: pad, roll and window partition (shape-only), the qkv Linear (V1: the
query's 1/sqrt(head_dim) folded into its rows; V2: separate query, key and value Linears, the
key without a bias), MatMul (V2: of the `F.normalize`d query and key, then a Mul by each
head's learned logit scale), the relative position bias added as a
trainable constant, the shift mask as `AdditiveMask` (-inf: the next quantizer saturates it
to its lowest code without counting it in its range; the exported Add of -32768 does the
same), nn.Softmax, MatMul, the windows merged back, and the proj Linear. V2's two
normalizations stay float steps (TIDL has no L2-normalize layer); everything else is quantized.

V2's key has no bias (torchvision zeroes it on every call), and calibration must not give it
one (`keep_bias_free`): a padded window's tokens are zeros, their keys exactly zero, and
`F.normalize` turns even a tiny key into a unit vector. The proj Linear runs per token after
the windows are merged and cropped, so its output range and bias correction come from real
tokens only. Before both, swin_v2_s (random weights) at 64x64, whose last stages' windows are mostly
padding, measured 0.5 dB output SQNR on held-out inputs (-0.4 dB with 16-bit activations);
after, 11.2 dB (16.2 dB); at 256x256 (no padding) 27.5 dB.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from quantfx.layers import keep_bias_free
from quantfx.modules import AdditiveMask
from quantfx.passes.graph_utils import (
    constant_value,
    inline_module,
    recorded_shape,
    unique_submodule_name,
)

try:
    from torchvision.models import swin_transformer
except ImportError:  # pragma: no cover - torchvision is a dependency
    swin_transformer = None

INNER_NAMES = {"matmul": "scores", "add": "biased_scores", "mask": "masked_scores",
               "softmax": "probabilities", "matmul_1": "context", "normalize": "unit_query",
               "normalize_1": "unit_key", "mul": "scaled_scores"}


def shifted_window_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int]) -> Tensor:
    """Where torchvision's `shifted_window_attention` adds -100 (True), (windows, N, N): pairs
    of tokens of one window that came from different regions before the cyclic shift."""
    regions = torch.zeros(pad_h, pad_w)
    count = 0
    for rows in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for columns in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[rows[0]:rows[1], columns[0]:columns[1]] = count
            count += 1
    windows = (pad_h // window[0]) * (pad_w // window[1])
    regions = regions.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    regions = regions.permute(0, 2, 1, 3).reshape(windows, window[0] * window[1])
    return (regions.unsqueeze(1) - regions.unsqueeze(2)) != 0


def linear_layer(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of `weight` and `bias` (a projection cut out of a fused
    weight, or read from a functional call)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class WindowAttentionPieces(nn.Module):
    """One `shifted_window_attention` call at a fixed (batch, H, W, C) input shape."""

    def __init__(self, arguments: dict[str, Any], shape: tuple[int, ...]) -> None:
        super().__init__()
        _, self.height, self.width, channels = shape
        self.window = list(arguments["window_size"])
        self.heads = int(arguments["num_heads"])
        self.pads = ((self.window[1] - self.width % self.window[1]) % self.window[1],
                     (self.window[0] - self.height % self.window[0]) % self.window[0])
        self.padded = (self.height + self.pads[1], self.width + self.pads[0])
        self.shift = [0 if self.window[axis] >= self.padded[axis] else
                      int(arguments["shift_size"][axis]) for axis in (0, 1)]
        self.logit_scale = _logit_scale(arguments)
        if self.logit_scale is None:
            self.qkv = _fused_query_key_value(arguments, channels, self.heads)
        else:
            self.query, self.key, self.value = _separate_projections(arguments, channels)
        self.position_bias = nn.Parameter(
            arguments["relative_position_bias"].detach().clone())
        self.mask = (AdditiveMask(shifted_window_mask(*self.padded, self.window, self.shift)
                                  .unsqueeze(1)) if sum(self.shift) else None)
        self.softmax = nn.Softmax(dim=-1)
        self.attention_dropout = nn.Dropout(float(arguments["attention_dropout"]))
        self.proj = linear_layer(arguments["proj_weight"].detach(), None
                            if arguments["proj_bias"] is None else arguments["proj_bias"].detach())
        self.dropout = nn.Dropout(float(arguments["dropout"]))

    def _roll(self, x: Tensor, direction: int) -> Tensor:
        """The cyclic shift, one axis at a time: each roll is its own Slice/Concat, which
        export then holds on its input's grid (Q/DQ after each Concat, as TIDL wants)."""
        for axis, shift in ((1, self.shift[0]), (2, self.shift[1])):
            if shift:
                x = torch.roll(x, direction * shift, axis)
        return x

    def _attend(self, windows: Tensor) -> Tensor:
        """(windows, N, C) -> (windows, N, C): attention inside each window."""
        head_size = windows.shape[-1] // self.heads
        if self.logit_scale is None:
            qkv = self.qkv(windows).unflatten(-1, (3, self.heads, head_size))
            query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            scores = torch.matmul(query, key.transpose(-2, -1))
        else:  # V2: cosine similarity, times each head's scale
            query, key, value = (layer(windows).unflatten(-1, (self.heads, head_size))
                                 .transpose(1, 2) for layer in (self.query, self.key, self.value))
            query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
            scores = torch.matmul(query, key.transpose(-2, -1)) * self.logit_scale
        scores = scores + self.position_bias
        if self.mask is not None:
            count = self.mask.mask.shape[0]
            scores = self.mask(scores.unflatten(0, (-1, count))).flatten(0, 1)
        probabilities = self.attention_dropout(self.softmax(scores))
        return torch.matmul(probabilities, value).transpose(1, 2).flatten(2)

    def forward(self, x: Tensor) -> Tensor:
        rows, columns = self.padded[0] // self.window[0], self.padded[1] // self.window[1]
        channels = x.shape[-1]
        if self.pads[1]:  # one axis at a time, like the rolls
            x = F.pad(x, (0, 0, 0, 0, 0, self.pads[1]))
        if self.pads[0]:
            x = F.pad(x, (0, 0, 0, self.pads[0]))
        x = self._roll(x, -1)
        windows = x.unflatten(1, (rows, self.window[0])).unflatten(3, (columns, self.window[1]))
        windows = windows.permute(0, 1, 3, 2, 4, 5).flatten(0, 2).flatten(1, 2)
        out = self._attend(windows)
        out = out.unflatten(1, (self.window[0], self.window[1])).unflatten(0, (-1, rows, columns))
        out = out.permute(0, 1, 3, 2, 4, 5).flatten(3, 4).flatten(1, 2)
        out = out.reshape(out.shape[0], self.padded[0], self.padded[1], channels)
        out = self._roll(out, 1)
        if any(self.pads):
            out = out[:, :self.height, :self.width, :]
        return self.dropout(self.proj(out))  # per token: after the crop, on real tokens only


def _logit_scale(arguments: dict[str, Any]) -> nn.Parameter | None:
    """V2's per-head scale exp(min(logit_scale, log 100)); None for V1."""
    logit_scale = arguments["logit_scale"]
    if logit_scale is None:
        return None
    return nn.Parameter(torch.clamp(logit_scale.detach(), max=math.log(100.0)).exp().clone())


def _fused_query_key_value(arguments: dict[str, Any], channels: int, heads: int) -> nn.Linear:
    """V1's qkv Linear with the query's 1/sqrt(head_dim) folded into its rows."""
    weight = arguments["qkv_weight"].detach().clone()
    bias = arguments["qkv_bias"]
    bias = None if bias is None else bias.detach().clone()
    scale = (channels // heads) ** -0.5
    weight[:channels] *= scale
    if bias is not None:
        bias[:channels] *= scale
    return linear_layer(weight, bias)


def _separate_projections(arguments: dict[str, Any], channels: int
                          ) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """V2's query, key and value Linears cut out of the qkv weight; the key has no bias."""
    weights = arguments["qkv_weight"].detach().split(channels)
    bias = arguments["qkv_bias"]
    biases = (None,) * 3 if bias is None else bias.detach().split(channels)
    return (linear_layer(weights[0], biases[0]), keep_bias_free(linear_layer(weights[1], None)),
            linear_layer(weights[2], biases[2]))


def _constant_arguments(graph_module: fx.GraphModule, arguments: dict[str, Any]
                        ) -> dict[str, Any] | None:
    """The call's arguments with weights, biases and the relative position bias evaluated
    (they are computed from parameters only), or None when the call is not one quantfx
    decomposes: a training-mode call, or weights that depend on the input."""
    if arguments["training"] is not False:
        return None
    values = dict(arguments)
    try:
        for name in ("qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
                     "relative_position_bias", "logit_scale"):
            values[name] = constant_value(graph_module, arguments[name])
    except LookupError:
        return None
    return values


def decompose_window_attention(graph_module: fx.GraphModule) -> int:
    """Replace every torchvision Swin `shifted_window_attention` call by its pieces (see
    the module text); returns how many calls were replaced."""
    if swin_transformer is None:  # pragma: no cover
        return 0
    function = swin_transformer.shifted_window_attention
    replaced = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target is not function:
            continue
        bound = inspect.signature(function).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        arguments = _constant_arguments(graph_module, bound.arguments)
        shape = recorded_shape(bound.arguments["input"])
        if arguments is None or shape is None or len(shape) != 4:
            continue
        target = unique_submodule_name(graph_module, f"{node.name}_pieces")
        graph_module.add_submodule(target, WindowAttentionPieces(arguments, shape))
        output = inline_module(graph_module, node, graph_module.get_submodule(target), target,
                               (arguments["input"],), INNER_NAMES)
        node.replace_all_uses_with(output)
        graph_module.graph.erase_node(node)
        replaced += 1
    if replaced:
        graph_module.graph.eliminate_dead_code()  # the relative position bias computation
        graph_module.recompile()
    return replaced

