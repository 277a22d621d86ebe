"""Normalizations that run in float between quantizers: BatchNorm that is neither folded nor a
`BatchNormLayer` (QAT models) and LayerNorm (written out step by step, so any opset has it).
A PTC BatchNorm that cannot fold is a quantized `BatchNormLayer` (`emitters/quantized.py`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from quantfx.errors import ExportError
from quantfx.export.builder import Builder


def emit_batchnorm(b: Builder, node: fx.Node, bn: nn.modules.batchnorm._BatchNorm) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise ExportError(f"BatchNorm '{node.target}' has no running statistics to export.")
    channels = bn.num_features
    weight = bn.weight if bn.weight is not None else torch.ones(channels)
    bias = bn.bias if bn.bias is not None else torch.zeros(channels)
    names = []
    for suffix, tensor in (("weight", weight), ("bias", bias), ("running_mean", bn.running_mean),
                           ("running_var", bn.running_var)):
        names.append(b.float_constant(f"{node.name}.{suffix}", tensor.detach().cpu().numpy()))
    b.emit(node, "BatchNormalization", [b.tensor_input(node)] + names, epsilon=float(bn.eps))


def emit_layer_norm(b: Builder, node: fx.Node, norm: nn.LayerNorm) -> None:
    """LayerNorm as ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div (+ affine): works at any opset.

    (LayerNormalization exists only from opset 17; the result is float and the quantizer that
    follows rounds it, so float-rounding differences can move an element by 1 LSB.)
    """
    rank = len(b.input_info(node).shape)
    axes = list(range(rank - len(norm.normalized_shape), rank))
    source, name = b.tensor_input(node), node.name
    b.reduce("ReduceMean", source, f"{name}.mean", axes)
    b.op("Sub", [source, f"{name}.mean"], f"{name}.centered")
    b.op("Mul", [f"{name}.centered", f"{name}.centered"], f"{name}.squared")
    b.reduce("ReduceMean", f"{name}.squared", f"{name}.variance", axes)
    epsilon = b.float_constant(f"{name}.eps", norm.eps)
    b.op("Add", [f"{name}.variance", epsilon], f"{name}.variance_eps")
    b.op("Sqrt", [f"{name}.variance_eps"], f"{name}.std")
    normalized = name if norm.weight is None and norm.bias is None else f"{name}.normalized"
    b.op("Div", [f"{name}.centered", f"{name}.std"], normalized)
    if normalized != name:
        weight = b.float_constant(f"{name}.weight", norm.weight.detach().cpu().numpy()
                                  if norm.weight is not None else np.ones(norm.normalized_shape))
        bias = b.float_constant(f"{name}.bias", norm.bias.detach().cpu().numpy()
                                if norm.bias is not None else np.zeros(norm.normalized_shape))
        b.op("Mul", [normalized, weight], f"{name}.scaled")
        b.op("Add", [f"{name}.scaled", bias], name)
    b.env[node] = name


def emit_normalize_call(b: Builder, node: fx.Node, module: None) -> None:
    """F.normalize(x, p=2, dim, eps) as torch computes it: x / max(sqrt(sum(x * x)), eps)
    (SSD's L2Norm). In float between quantizers, like LayerNorm."""
    p, dim, eps = b.call_arguments(node, ("p", "dim", "eps"))
    p = 2.0 if p is None else float(p)
    dim = 1 if dim is None else dim
    eps = 1e-12 if eps is None else float(eps)
    if p != 2.0 or not isinstance(dim, int):
        raise ExportError(f"node '{node.name}': F.normalize with p={p}, dim={dim} has no "
                          "emitter (p=2 over one dimension has).")
    rank = len(b.input_info(node).shape)
    source, name = b.tensor_input(node), node.name
    b.op("Mul", [source, source], f"{name}.squared")
    b.reduce("ReduceSum", f"{name}.squared", f"{name}.sum", [dim % rank])
    b.op("Sqrt", [f"{name}.sum"], f"{name}.norm")
    b.op("Max", [f"{name}.norm", b.float_constant(f"{name}.eps", eps)], f"{name}.denominator")
    b.emit(node, "Div", [source, f"{name}.denominator"])


def emit_group_norm(b: Builder, node: fx.Node, norm: nn.GroupNorm) -> None:
    """GroupNorm as Reshape to (N, groups, -1), the LayerNorm steps over the last axis, Reshape
    back, then the per-channel affine (FCOS / RetinaNet v2 heads). Float between quantizers."""
    shape = b.input_info(node).shape
    source, name = b.tensor_input(node), node.name
    b.reshape(f"{name}.grouped", source, f"{name}.grouped", (shape[0], norm.num_groups, -1))
    b.reduce("ReduceMean", f"{name}.grouped", f"{name}.mean", [2])
    b.op("Sub", [f"{name}.grouped", f"{name}.mean"], f"{name}.centered")
    b.op("Mul", [f"{name}.centered", f"{name}.centered"], f"{name}.squared")
    b.reduce("ReduceMean", f"{name}.squared", f"{name}.variance", [2])
    epsilon = b.float_constant(f"{name}.eps", norm.eps)
    b.op("Add", [f"{name}.variance", epsilon], f"{name}.variance_eps")
    b.op("Sqrt", [f"{name}.variance_eps"], f"{name}.std")
    b.op("Div", [f"{name}.centered", f"{name}.std"], f"{name}.normalized")
    affine = norm.affine
    target = f"{name}.ungrouped" if affine else name
    b.reshape(target, f"{name}.normalized", target, tuple(shape))
    if affine:
        channel = (norm.num_channels,) + (1,) * (len(shape) - 2)
        weight = b.float_constant(f"{name}.weight",
                                  norm.weight.detach().cpu().numpy().reshape(channel))
        bias = b.float_constant(f"{name}.bias", norm.bias.detach().cpu().numpy().reshape(channel))
        b.op("Mul", [target, weight], f"{name}.scaled")
        b.op("Add", [f"{name}.scaled", bias], name)
    b.env[node] = name
