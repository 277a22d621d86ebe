"""nn.MultiheadAttention in float between quantizers (MatMul / Softmax / Transpose), when
quantfx keeps it whole (masked attention), and the shift mask of quantized window attention."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch.fx as fx
from torch import nn

from quantfx.errors import ExportError
from quantfx.export.builder import Builder
from quantfx.modules import AdditiveMask


def _mha_argument(node: fx.Node, position: int, keyword: str, default: Any) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)


MASK_CODE, MASK_SCALE = -128, 256.0
"""A masked score is written as the int8 code -128 at scale 256: -32768, below the range of
any scores quantizer whose step is under 1, which saturates it to its lowest code -- what
quantfx computes from the -inf of `AdditiveMask`."""


def emit_additive_mask(b: Builder, node: fx.Node, module: AdditiveMask) -> None:
    """`AdditiveMask` as Add of a Q/DQ constant (0 or -32768): the following Q/DQ saturates
    the masked scores exactly as the converted model's -inf does."""
    mask = module.mask.detach().cpu().numpy()
    codes = b.constant(f"{node.name}.mask_quantized",
                       np.where(mask, MASK_CODE, 0).astype(np.int8))
    scale = b.float_constant(f"{node.name}.mask_scale", MASK_SCALE)
    zero = b.constant(f"{node.name}.mask_zero_point", np.zeros((), dtype=np.int8))
    b.add("DequantizeLinear", [codes, scale, zero], [f"{node.name}.mask"],
          f"{node.name}.mask.dequantize")
    b.emit(node, "Add", [b.tensor_input(node), f"{node.name}.mask"])


def attend(b: Builder, name: str, scores: str, value: str) -> str:
    """Softmax over the last axis of `scores`, then the weighted sum of `value`: the part every
    attention shares (`{name}.probabilities`, `{name}.context`); returns the context."""
    probabilities = b.op("Softmax", [scores], f"{name}.probabilities", axis=-1)
    return b.op("MatMul", [probabilities, value], f"{name}.context")


def _refuse_unsupported(node: fx.Node, attention: nn.MultiheadAttention) -> None:
    unsupported = [keyword for position, keyword in ((3, "key_padding_mask"), (5, "attn_mask"))
                   if _mha_argument(node, position, keyword, None) is not None]
    if _mha_argument(node, 7, "is_causal", False):
        unsupported.append("is_causal")
    if attention.bias_k is not None or attention.add_zero_attn:
        unsupported.append("add_bias_kv/add_zero_attn")
    if unsupported:
        raise ExportError(
            f"cannot export MultiheadAttention '{node.target}' with {', '.join(unsupported)}: "
            "quantfx exports unmasked attention only. Fold the mask into the model's inputs or "
            "report the use case to the quantfx developers."
        )


def _project(b: Builder, node: fx.Node, attention: nn.MultiheadAttention, position: int,
             shapes: list[tuple[int, ...]]) -> str:
    """Query, key or value (`position` 0, 1, 2): projected, split into heads, as
    (N, heads, L, head_dim) -- the key transposed to (N, heads, head_dim, L)."""
    name, role = node.name, ("query", "key", "value")[position]
    embed, heads = attention.embed_dim, attention.num_heads
    if attention.in_proj_weight is not None:
        weight = attention.in_proj_weight.detach().split(embed)[position]
    else:
        weight = getattr(attention, f"{'qkv'[position]}_proj_weight").detach()
    bias = (attention.in_proj_bias.detach().split(embed)[position]
            if attention.in_proj_bias is not None else None)
    source = b.value(_mha_argument(node, position, role, None))
    shape = shapes[position]
    if not attention.batch_first and len(shape) == 3:
        source = b.op("Transpose", [source], f"{name}.{role}_nle", perm=[1, 0, 2])
        shape = (shape[1], shape[0], shape[2])
    projected = b.float_linear(f"{name}.{role}_projected", source, weight, bias)
    batch = shape[0] if len(shape) == 3 else 1
    b.reshape(f"{name}.{role}_heads", projected, f"{name}.{role}_heads",
              (batch, shape[-2], heads, embed // heads))
    return b.op("Transpose", [f"{name}.{role}_heads"], f"{name}.{role}_split",
                perm=[0, 2, 3, 1] if role == "key" else [0, 2, 1, 3])


def _attention_weights(b: Builder, node: fx.Node) -> str | None:
    """The averaged (or per-head) attention weights output, when the call asks for it."""
    if not bool(_mha_argument(node, 4, "need_weights", True)):
        return None
    name = node.name
    weights_name = f"{name}.weights"
    probabilities = f"{name}.probabilities"
    if bool(_mha_argument(node, 6, "average_attn_weights", True)):
        b.reduce("ReduceMean", probabilities, f"{name}.weights_mean", [1])
        probabilities = f"{name}.weights_mean"
    b.reshape(weights_name, probabilities, weights_name, b.records[node][1].shape)
    return weights_name


def emit_multihead_attention(b: Builder, node: fx.Node, attention: nn.MultiheadAttention
                              ) -> None:
    """nn.MultiheadAttention in float, as MatMul/Softmax/Transpose (quantfx quantizes only its
    output, which the following Quantize rounds: float-rounding differences can move an element
    by 1 LSB). Masks, bias_k/bias_v and add_zero_attn are refused with a clear error."""
    _refuse_unsupported(node, attention)
    name = node.name
    embed, heads = attention.embed_dim, attention.num_heads
    shapes = [b.input_info(node, position).shape for position in range(3)]
    query, key, value = (_project(b, node, attention, position, shapes) for position in range(3))
    scale = b.float_constant(f"{name}.scale", 1.0 / math.sqrt(embed // heads))
    scaled = b.op("Mul", [query, scale], f"{name}.query_scaled")
    context = attend(b, name, b.op("MatMul", [scaled, key], f"{name}.scores"), value)
    context = b.op("Transpose", [context], f"{name}.context_nlhd", perm=[0, 2, 1, 3])
    batched = (shapes[0] if attention.batch_first or len(shapes[0]) == 2
               else (shapes[0][1], shapes[0][0], shapes[0][2]))
    batch = batched[0] if len(batched) == 3 else 1
    b.reshape(f"{name}.context_merged", context, f"{name}.context_merged",
              (batch, batched[-2], embed))
    result = b.float_linear(f"{name}.out", f"{name}.context_merged",
                           attention.out_proj.weight, attention.out_proj.bias)
    if not attention.batch_first and len(shapes[0]) == 3:
        b.op("Transpose", [result], name, perm=[1, 0, 2])
    else:
        b.reshape(name, result, name, tuple(shapes[0][:-1]) + (embed,))
    b.env[node] = [name, _attention_weights(b, node)]
