"""Which emitter writes which FX node: plain ordered tables, first match wins.

Adding an op is one emitter function (in the `emitters` module of its family), one row here
and one test. Shape-only ops are read from `quantfx.ops`, so placement and export cannot
disagree about them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from quantfx import modules as standins
from quantfx.errors import ExportError
from quantfx.export.builder import Builder
from quantfx.export.emitters import (
    activations,
    arithmetic,
    attention,
    indexing,
    norms,
    pooling,
    quantized,
    shapes,
    swin,
)
from quantfx.layers import FakeQuantLayer, IntegerLayer, PReLULayer
from quantfx.ops import DROPOUT_FUNCTIONS, IDENTITY_CALLS, IDENTITY_MODULES, RESHAPE_CALLS
from quantfx.passes.graph_utils import is_float_tensor
from quantfx.quantizers import FrozenQuantizer, Quantizer

Emitter = Callable[[Builder, fx.Node, Any], None]
"""(builder, FX node, the node's module or None) -> None; sets builder.env[node]."""

MODULE_EMITTERS: list[tuple[type[nn.Module] | tuple[type[nn.Module], ...], Emitter]] = [
    (FrozenQuantizer, quantized.emit_quantize),
    (IntegerLayer, quantized.emit_integer_layer),
    (PReLULayer, quantized.emit_prelu_layer),
    (nn.ReLU, activations.unary("Relu")),
    (nn.ReLU6, activations.emit_relu6),
    (nn.Hardtanh, activations.emit_hardtanh),
    (nn.LeakyReLU, activations.emit_leaky_relu),
    (standins.HardSwish, activations.emit_hard_swish),
    (standins.HardSigmoid, activations.emit_hard_sigmoid),
    (nn.Hardswish, activations.emit_hardswish),
    (nn.Hardsigmoid, activations.emit_hardsigmoid),
    (nn.Sigmoid, activations.unary("Sigmoid")),
    (nn.Tanh, activations.unary("Tanh")),
    (nn.SiLU, activations.emit_silu),
    (nn.GELU, activations.emit_gelu),
    (nn.Softmax, activations.emit_softmax),
    (nn.modules.batchnorm._BatchNorm, norms.emit_batchnorm),
    (nn.LayerNorm, norms.emit_layer_norm),
    (nn.GroupNorm, norms.emit_group_norm),
    (nn.MultiheadAttention, attention.emit_multihead_attention),
    (standins.AdditiveMask, attention.emit_additive_mask),
    (standins.Add, arithmetic.binary("Add")),
    (standins.Sub, arithmetic.binary("Sub")),
    (standins.Mul, arithmetic.binary("Mul")),
    (standins.Stack, arithmetic.emit_stack),
    (standins.Cat, arithmetic.emit_cat),
    (standins.Reduction, pooling.emit_reduction),
    (standins.Interpolate, pooling.emit_interpolate),
    (nn.modules.pooling._AvgPoolNd, pooling.emit_avgpool),
    (nn.modules.pooling._MaxPoolNd, pooling.emit_maxpool),
    (nn.modules.pooling._AdaptiveAvgPoolNd,
     pooling.adaptive_pool("GlobalAveragePool", "AveragePool")),
    (nn.modules.pooling._AdaptiveMaxPoolNd, pooling.adaptive_pool("GlobalMaxPool", "MaxPool")),
    (nn.Flatten, shapes.emit_flatten),
    (nn.Unflatten, shapes.emit_reshape),
    (nn.PixelShuffle, shapes.emit_pixel_shuffle),
    (nn.PixelUnshuffle, shapes.emit_pixel_unshuffle),
    (nn.ChannelShuffle, shapes.emit_channel_shuffle),
    ((standins.Pad, standins.ConstantPad), shapes.emit_pad),
    (IDENTITY_MODULES, shapes.emit_identity),
]
"""Module type -> emitter, first match wins (so subclasses go before their bases)."""

CALL_EMITTERS: dict[Any, Emitter] = {
    operator.getitem: indexing.emit_getitem, "__getitem__": indexing.emit_getitem,
    "chunk": indexing.emit_split, torch.chunk: indexing.emit_split,
    "split": indexing.emit_split, torch.split: indexing.emit_split,
    "unbind": indexing.emit_unbind, torch.unbind: indexing.emit_unbind,
    "narrow": indexing.emit_narrow, torch.narrow: indexing.emit_narrow,
    "roll": indexing.emit_roll, torch.roll: indexing.emit_roll,
    "flip": indexing.emit_flip, torch.flip: indexing.emit_flip,
    "transpose": shapes.emit_transpose, torch.transpose: shapes.emit_transpose,
    "swapaxes": shapes.emit_transpose, torch.swapaxes: shapes.emit_transpose,
    "swapdims": shapes.emit_transpose, torch.swapdims: shapes.emit_transpose,
    "permute": shapes.emit_transpose, torch.permute: shapes.emit_transpose,
    "t": shapes.emit_transpose, torch.t: shapes.emit_transpose,
    "movedim": shapes.emit_movedim, torch.movedim: shapes.emit_movedim,
    "expand": shapes.emit_expand, "expand_as": shapes.emit_expand,
    "repeat": shapes.emit_repeat,
    F.pixel_shuffle: shapes.emit_pixel_shuffle,
    F.pixel_unshuffle: shapes.emit_pixel_unshuffle,
    torch.channel_shuffle: shapes.emit_channel_shuffle,
    torch.flatten: shapes.emit_flatten,
    **{target: shapes.emit_reshape for target in RESHAPE_CALLS if target is not torch.flatten},
    **{target: shapes.emit_identity for target in IDENTITY_CALLS},
    **{target: shapes.emit_dropout_call for target in DROPOUT_FUNCTIONS},
    F.max_pool1d: pooling.emit_max_pool_call, F.max_pool2d: pooling.emit_max_pool_call,
    F.max_pool3d: pooling.emit_max_pool_call,
    "amax": pooling.emit_amax, torch.amax: pooling.emit_amax,
    torch.matmul: arithmetic.emit_matmul, operator.matmul: arithmetic.emit_matmul,
    "matmul": arithmetic.emit_matmul, torch.bmm: arithmetic.emit_matmul,
    "bmm": arithmetic.emit_matmul,
    torch.einsum: arithmetic.emit_einsum,
    F.normalize: norms.emit_normalize_call,
    F.pad: shapes.emit_pad_call,
    **{target: arithmetic.call_binary("Div") for target in (
        operator.truediv, torch.div, torch.true_divide, "div", "div_", "true_divide")},
    **{target: arithmetic.call_binary("Max") for target in (torch.maximum, "maximum")},
    **{target: arithmetic.call_binary("Min") for target in (torch.minimum, "minimum")},
    **{target: arithmetic.call_unary("Neg") for target in (operator.neg, torch.neg, "neg")},
    **{target: arithmetic.call_unary("Abs") for target in (torch.abs, "abs", "abs_")},
    **{target: arithmetic.call_unary("Exp") for target in (torch.exp, "exp", "exp_")},
    **{target: arithmetic.call_unary("Log") for target in (torch.log, "log", "log_")},
    **{target: arithmetic.call_unary("Sqrt") for target in (torch.sqrt, "sqrt", "sqrt_")},
    **{target: arithmetic.emit_pow for target in (operator.pow, torch.pow, "pow", "pow_")},
    **{target: arithmetic.emit_clamp for target in (
        torch.clamp, torch.clip, "clamp", "clip", "clamp_", "clip_", torch.clamp_min,
        torch.clamp_max, "clamp_min", "clamp_max", "clamp_min_", "clamp_max_")},
}
"""Function or Tensor-method name -> emitter for call_function / call_method nodes."""

WRAPPED_EMITTERS: dict[str, Emitter] = {
    "torchvision.models.swin_transformer._patch_merging_pad": swin.emit_patch_merging_pad,
    "torchvision.models.swin_transformer.shifted_window_attention":
        swin.emit_shifted_window_attention,
}
"""`@torch.fx.wrap` functions of torchvision (leaves in quantfx's graph) -> emitter, by
qualified name (no torchvision import needed)."""


def qualified_name(target: Any) -> str:
    """`module.qualname` of a function (how WRAPPED_EMITTERS knows it)."""
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"


def emitter_for(b: Builder, node: fx.Node) -> tuple[Emitter, Any]:
    """The emitter of `node` and its module (None for calls), or an ExportError naming it."""
    if node.op == "call_module":
        module = b.module.get_submodule(node.target)
        for module_type, emitter in MODULE_EMITTERS:
            if isinstance(module, module_type):
                return emitter, module
        raise ExportError(
            f"cannot export node '{node.name}': module '{node.target}' of type "
            f"{type(module).__module__}.{type(module).__name__} has no ONNX emitter in quantfx. "
            "Replace it by supported layers, or report the op to the quantfx developers."
        )
    emitter = CALL_EMITTERS.get(node.target)
    if emitter is None and callable(node.target):
        emitter = WRAPPED_EMITTERS.get(qualified_name(node.target))
    if emitter is None:
        what = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", repr(node.target))
        raise ExportError(
            f"cannot export node '{node.name}': {node.op} '{what}' has no ONNX emitter in "
            "quantfx. Rewrite it with supported ops (or wrap it in a supported module), or "
            "report the op to the quantfx developers."
        )
    return emitter, None


def unexportable(graph_module: fx.GraphModule) -> list[str]:
    """'cumsum (node cumsum)' for each tensor-computing node of a prepared graph that no
    emitter can write: said at prepare, so a user learns it before calibrating."""
    found = []
    data_dependent: set[fx.Node] = set()  # what export cannot fold into a constant
    for node in graph_module.graph.nodes:
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        if node.op == "placeholder" or any(arg in data_dependent for arg in inputs):
            data_dependent.add(node)
        if node.op not in ("call_module", "call_function", "call_method") or (
                node not in data_dependent):
            continue
        meta = node.meta.get("tensor_meta")
        several = isinstance(meta, (list, tuple)) and not isinstance(meta, TensorMetadata)
        if not is_float_tensor(node) and not several:  # a tensor, or several (an LSTM's)
            continue
        if node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            if isinstance(module, (FakeQuantLayer, Quantizer)) or any(
                    isinstance(module, kind) for kind, _ in MODULE_EMITTERS):
                continue
            found.append(f"{type(module).__name__} (module '{node.target}')")
        elif node.target not in CALL_EMITTERS and not (
                callable(node.target) and qualified_name(node.target) in WRAPPED_EMITTERS):
            what = node.target if isinstance(node.target, str) else getattr(
                node.target, "__name__", repr(node.target))
            found.append(f"{what} (node '{node.name}')")
    return found
