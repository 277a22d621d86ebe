"""nn.MultiheadAttention in float between quantizers (MatMul / Softmax / Transpose)."""

from __future__ import annotations

import math
from typing import Any

import torch.fx as fx
from torch import nn

from quantfx.errors import ExportError
from quantfx.export.builder import Builder


def _mha_argument(node: fx.Node, position: int, keyword: str, default: Any) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)


def emit_multihead_attention(b: Builder, node: fx.Node, attention: nn.MultiheadAttention
                              ) -> None:
    """nn.MultiheadAttention in float, as MatMul/Softmax/Transpose (quantfx quantizes only its
    output, which the following Quantize rounds: float-rounding differences can move an element
    by 1 LSB). Masks, bias_k/bias_v and add_zero_attn are refused with a clear error."""
    name = node.name
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
    need_weights = bool(_mha_argument(node, 4, "need_weights", True))
    average_weights = bool(_mha_argument(node, 6, "average_attn_weights", True))
    embed, heads = attention.embed_dim, attention.num_heads
    head_dim = embed // heads
    if attention.in_proj_weight is not None:
        weights = attention.in_proj_weight.detach().split(embed)
    else:
        weights = (attention.q_proj_weight.detach(), attention.k_proj_weight.detach(),
                   attention.v_proj_weight.detach())
    biases = (attention.in_proj_bias.detach().split(embed)
              if attention.in_proj_bias is not None else (None, None, None))
    shapes = [b.input_info(node, position).shape for position in range(3)]
    if attention.batch_first or len(shapes[0]) == 2:
        batched = shapes  # (N, L, E) or unbatched (L, E)
    else:
        batched = [(shape[1], shape[0], shape[2]) for shape in shapes]

    def project(position: int, role: str) -> str:
        source = b.value(_mha_argument(node, position, ("query", "key", "value")[position], None))
        if not attention.batch_first and len(shapes[position]) == 3:
            b.add("Transpose", [source], [f"{name}.{role}_nle"], f"{name}.{role}_nle",
                  perm=[1, 0, 2])
            source = f"{name}.{role}_nle"
        projected = b.float_linear(f"{name}.{role}_projected", source, weights[position],
                                  biases[position])
        batch = batched[position][0] if len(batched[position]) == 3 else 1
        length = batched[position][-2]
        b.reshape(f"{name}.{role}_heads", projected, f"{name}.{role}_heads",
                  (batch, length, heads, head_dim))
        perm = [0, 2, 3, 1] if role == "key" else [0, 2, 1, 3]
        b.add("Transpose", [f"{name}.{role}_heads"], [f"{name}.{role}_split"],
              f"{name}.{role}_split", perm=perm)
        return f"{name}.{role}_split"

    query, key, value = project(0, "query"), project(1, "key"), project(2, "value")
    scale = b.float_constant(f"{name}.scale", 1.0 / math.sqrt(head_dim))
    b.add("Mul", [query, scale], [f"{name}.query_scaled"], f"{name}.query_scaled")
    b.add("MatMul", [f"{name}.query_scaled", key], [f"{name}.scores"], f"{name}.scores")
    b.add("Softmax", [f"{name}.scores"], [f"{name}.probabilities"], f"{name}.probabilities",
          axis=-1)
    b.add("MatMul", [f"{name}.probabilities", value], [f"{name}.context"], f"{name}.context")
    b.add("Transpose", [f"{name}.context"], [f"{name}.context_nlhd"], f"{name}.context_nlhd",
          perm=[0, 2, 1, 3])
    batch = batched[0][0] if len(batched[0]) == 3 else 1
    length = batched[0][-2]
    b.reshape(f"{name}.context_merged", f"{name}.context_nlhd", f"{name}.context_merged",
              (batch, length, embed))
    result = b.float_linear(f"{name}.out", f"{name}.context_merged",
                           attention.out_proj.weight, attention.out_proj.bias)
    if not attention.batch_first and len(shapes[0]) == 3:
        b.add("Transpose", [result], [name], name, perm=[1, 0, 2])
    else:
        b.reshape(name, result, name, tuple(shapes[0][:-1]) + (embed,))
    outputs: list[Any] = [name, None]
    if need_weights:
        weights_name = f"{name}.weights"
        if average_weights:
            b.reduce("ReduceMean", f"{name}.probabilities", f"{name}.weights_mean", [1])
            record = b.records[node][1]
            b.reshape(weights_name, f"{name}.weights_mean", weights_name, record.shape)
        else:
            b.reshape(weights_name, f"{name}.probabilities", weights_name,
                      b.records[node][1].shape)
        outputs[1] = weights_name
    b.env[node] = outputs
