"""Pooling, reductions and resizing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import nn

from quantfx import modules as standins
from quantfx.errors import ExportError
from quantfx.export.builder import Builder


def _per_dim(value: Any, rank: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [int(value)] * rank


def emit_reduction(b: Builder, node: fx.Node, module: standins.Reduction) -> None:
    """A mean (ReduceMean) or sum (ReduceSum, `standins.Sum`) over dims."""
    rank = len(b.input_info(node).shape)
    dims = module.dim
    dims = list(range(rank)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    axes = sorted(dim % rank for dim in dims)
    op = "ReduceSum" if isinstance(module, standins.Sum) else "ReduceMean"
    b.reduce(op, b.tensor_input(node), node.name, axes, keepdims=int(module.keepdim))
    b.env[node] = node.name


def emit_amax(b: Builder, node: fx.Node, module: Any) -> None:
    """`amax` (a max over dims: exact, and TIDL's global max pool when over H and W)."""
    rank = len(b.input_info(node).shape)
    args = [b.value(arg) for arg in node.args[1:]]
    dims = args[0] if args else node.kwargs.get("dim", ())
    keepdim = bool(args[1] if len(args) > 1 else node.kwargs.get("keepdim", False))
    dims = [dims] if isinstance(dims, int) else list(dims) or list(range(rank))
    axes = sorted(dim % rank for dim in dims)
    b.reduce("ReduceMax", b.tensor_input(node), node.name, axes, keepdims=int(keepdim))
    b.env[node] = node.name


def emit_avgpool(b: Builder, node: fx.Node, pool: nn.Module) -> None:
    rank = len(b.input_info(node).shape) - 2
    if getattr(pool, "divisor_override", None):
        raise ExportError(f"avg pool '{node.target}' uses divisor_override, which ONNX lacks.")
    kernel = _per_dim(pool.kernel_size, rank)
    stride = _per_dim(pool.stride if pool.stride else pool.kernel_size, rank)
    padding = _per_dim(pool.padding, rank)
    b.emit(node, "AveragePool", [b.tensor_input(node)], kernel_shape=kernel, strides=stride,
           pads=padding * 2, ceil_mode=int(pool.ceil_mode),
           count_include_pad=int(pool.count_include_pad))


def emit_maxpool(b: Builder, node: fx.Node, pool: nn.Module) -> None:
    rank = len(b.input_info(node).shape) - 2
    if pool.return_indices:
        raise ExportError(f"max pool '{node.target}' returns indices; export supports values only.")
    kernel = _per_dim(pool.kernel_size, rank)
    stride = _per_dim(pool.stride if pool.stride else pool.kernel_size, rank)
    attributes = dict(kernel_shape=kernel, strides=stride, pads=_per_dim(pool.padding, rank) * 2,
                      ceil_mode=int(pool.ceil_mode))
    dilation = _per_dim(pool.dilation, rank)
    if any(d != 1 for d in dilation):
        attributes["dilations"] = dilation
    b.emit(node, "MaxPool", [b.tensor_input(node)], **attributes)


def adaptive_pool(global_op: str, window_op: str) -> Callable[[Builder, fx.Node, Any], None]:
    """An emitter of adaptive pooling: the global op to 1x1, else whole windows."""
    def emit(b: Builder, node: fx.Node, pool: nn.Module) -> None:
        in_shape = b.input_info(node).shape
        out_shape = b.info(node).shape
        source = b.tensor_input(node)
        if all(size == 1 for size in out_shape[2:]):
            b.emit(node, global_op, [source])
        elif all(i % o == 0 for i, o in zip(in_shape[2:], out_shape[2:])):
            kernel = [i // o for i, o in zip(in_shape[2:], out_shape[2:])]
            b.emit(node, window_op, [source], kernel_shape=kernel, strides=kernel)
        else:
            raise ExportError(
                f"adaptive pool '{node.target}' maps {in_shape[2:]} to {out_shape[2:]}, which is "
                "not a whole-window pooling; ONNX has no adaptive pool. Choose an input size "
                "divisible by the output size, or use a plain pool."
            )
    return emit


def emit_interpolate(b: Builder, node: fx.Node, module: standins.Interpolate) -> None:
    mode = module.mode
    if module.antialias:
        raise ExportError(f"resize '{node.target}' uses antialias=True, which TIDL lacks.")
    if mode in ("nearest", "nearest-exact"):
        attributes = dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                          nearest_mode="floor")
        if mode == "nearest-exact":
            attributes.update(coordinate_transformation_mode="half_pixel",
                              nearest_mode="round_prefer_ceil")
    elif mode in ("linear", "bilinear", "trilinear"):
        transform = "align_corners" if module.align_corners else "pytorch_half_pixel"
        attributes = dict(mode="linear", coordinate_transformation_mode=transform)
    else:
        raise ExportError(f"resize '{node.target}' uses mode '{mode}', which has no exact ONNX "
                          "Resize equivalent here; use nearest or (bi)linear.")
    b.emit(node, "Resize", [b.tensor_input(node), *b.resize_inputs(node.name, b.info(node).shape)],
           **attributes)


_MAX_POOLS = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


def emit_max_pool_call(b: Builder, node: fx.Node, module: Any) -> None:
    """F.max_pool1d/2d/3d left as calls (normalize turns most F.max_pool2d into modules)."""
    rank = len(b.input_info(node).shape) - 2
    kernel, stride, padding, dilation, ceil_mode, return_indices = b.call_arguments(
        node, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"))
    pool = _MAX_POOLS[rank](kernel, stride, padding or 0, dilation or 1, bool(return_indices),
                            bool(ceil_mode))
    emit_maxpool(b, node, pool)
