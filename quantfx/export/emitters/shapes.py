"""Shape-only ops that move values without selecting them: reshape, flatten, transpose, permute,
movedim, expand, pixel (un)shuffle, channel shuffle, identity. Their output is on their input's
grid, so they export bit-exact and need no Q/DQ (TIDL: Flatten, Reshape, Transpose)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from quantfx.errors import ExportError
from quantfx.export.builder import Builder


def _flatten_dims(node: fx.Node, module: Any) -> tuple[int, int]:
    if isinstance(module, nn.Flatten):
        return module.start_dim, module.end_dim
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start, end


def emit_flatten(b: Builder, node: fx.Node, module: Any) -> None:
    in_rank = len(b.input_info(node).shape)
    start, end = _flatten_dims(node, module)
    if start % in_rank >= 1 and end % in_rank == in_rank - 1 and len(b.info(node).shape) == 2:
        b.emit(node, "Flatten", [b.tensor_input(node)], axis=start % in_rank)
    else:
        emit_reshape(b, node, module)


def emit_reshape(b: Builder, node: fx.Node, module: Any) -> None:
    """Any pure reshape, to the static shape the converted model computed."""
    b.reshape(node.name, b.tensor_input(node), node.name, b.info(node).shape)
    b.env[node] = node.name


def emit_identity(b: Builder, node: fx.Node, module: Any) -> None:
    """An op that returns its input (Identity, eval-mode dropout, contiguous): no ONNX node."""
    b.env[node] = b.tensor_input(node)


def emit_dropout_call(b: Builder, node: fx.Node, module: Any) -> None:
    """F.dropout*: the identity when traced with training=False (as in an eval-mode model)."""
    positional = node.args[2] if len(node.args) > 2 else None
    training = node.kwargs.get("training", positional if positional is not None else True)
    if training:
        raise ExportError(f"'{node.name}' applies dropout with training=True, so the model is "
                          "random; call F.dropout(x, p, training=self.training) and export the "
                          "model in eval mode.")
    emit_identity(b, node, module)


def emit_expand(b: Builder, node: fx.Node, module: Any) -> None:
    shape = b.int64_constant(f"{node.name}.shape", b.info(node).shape)
    b.emit(node, "Expand", [b.tensor_input(node), shape])


def emit_repeat(b: Builder, node: fx.Node, module: Any) -> None:
    """Tensor.repeat as Tile (torch prepends dims when given more repeats than the rank)."""
    in_shape = b.input_info(node).shape
    out_shape = b.info(node).shape
    source = b.tensor_input(node)
    if len(out_shape) > len(in_shape):
        lifted = (1,) * (len(out_shape) - len(in_shape)) + tuple(in_shape)
        b.reshape(f"{node.name}.lifted", source, f"{node.name}.lifted", lifted)
        source, in_shape = f"{node.name}.lifted", lifted
    repeats = [out // size for out, size in zip(out_shape, in_shape)]
    b.emit(node, "Tile", [source, b.int64_constant(f"{node.name}.repeats", repeats)])


def emit_transpose(b: Builder, node: fx.Node, module: Any) -> None:
    """transpose / swapaxes / swapdims / permute / t as one Transpose."""
    rank = len(b.input_info(node).shape)
    args = [b.value(arg) for arg in node.args[1:]]
    if node.target in ("permute", torch.permute):
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = dims or node.kwargs.get("dims")
        perm = [int(d) % rank for d in dims]
    elif node.target in ("t", torch.t):
        perm = list(reversed(range(rank)))
    else:
        first = args[0] if args else node.kwargs.get("dim0", node.kwargs.get("axis0"))
        second = args[1] if len(args) > 1 else node.kwargs.get("dim1", node.kwargs.get("axis1"))
        perm = list(range(rank))
        first, second = first % rank, second % rank
        perm[first], perm[second] = perm[second], perm[first]
    b.emit(node, "Transpose", [b.tensor_input(node)], perm=perm)


def emit_movedim(b: Builder, node: fx.Node, module: Any) -> None:
    rank = len(b.input_info(node).shape)
    source, destination = b.call_arguments(node, ("source", "destination"))
    sources = [source] if isinstance(source, int) else list(source)
    destinations = [destination] if isinstance(destination, int) else list(destination)
    sources = [dim % rank for dim in sources]
    destinations = [dim % rank for dim in destinations]
    rest = iter(dim for dim in range(rank) if dim not in sources)
    placed = dict(zip(destinations, sources))
    perm = [placed[axis] if axis in placed else next(rest) for axis in range(rank)]
    b.emit(node, "Transpose", [b.tensor_input(node)], perm=perm)


def emit_pixel_shuffle(b: Builder, node: fx.Node, module: Any) -> None:
    factor = module.upscale_factor if module is not None else b.call_arguments(
        node, ("upscale_factor",))[0]
    b.emit(node, "DepthToSpace", [b.tensor_input(node)], blocksize=factor, mode="CRD")


def emit_pixel_unshuffle(b: Builder, node: fx.Node, module: Any) -> None:
    """pixel_unshuffle as Reshape/Transpose/Reshape (SpaceToDepth orders channels otherwise)."""
    factor = module.downscale_factor if module is not None else b.call_arguments(
        node, ("downscale_factor",))[0]
    *lead, channels, height, width = b.input_info(node).shape
    batch = int(np.prod(lead)) if lead else 1
    name = node.name
    b.reshape(f"{name}.split", b.tensor_input(node), f"{name}.split",
              (batch, channels, height // factor, factor, width // factor, factor))
    b.op("Transpose", [f"{name}.split"], f"{name}.moved", perm=[0, 1, 3, 5, 2, 4])
    b.reshape(name, f"{name}.moved", name, b.info(node).shape)
    b.env[node] = name


def emit_channel_shuffle(b: Builder, node: fx.Node, module: Any) -> None:
    batch, channels, *rest = b.input_info(node).shape
    groups = module.groups if module is not None else b.call_arguments(node, ("groups",))[0]
    grouped = f"{node.name}.grouped"
    b.reshape(grouped, b.tensor_input(node), grouped, (batch, groups, channels // groups, *rest))
    swapped = f"{node.name}.transpose"
    perm = [0, 2, 1] + list(range(3, 3 + len(rest)))
    b.op("Transpose", [grouped], swapped, perm=perm)
    b.reshape(node.name, swapped, node.name, (batch, channels, *rest))
    b.env[node] = node.name


ONNX_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge",
                  "circular": "wrap"}
WRAP_PAD_OPSET = 19
"""ONNX Pad's "wrap" (torch's circular) mode exists from opset 19."""


def _pad_by_concat(b: Builder, node: fx.Node, begins: list[int], ends: list[int]) -> None:
    """Zero padding of axes TIDL's Pad does not take (it pads the last two axes only: Swin's
    (N, H, W, C) windows pad H and W) as a Concat with zeros per axis, which TIDL runs on axes
    -3 and -2; zero is on every grid, so the result keeps its input's (export adds the Q/DQ
    after the Concat)."""
    source, shape = b.tensor_input(node), list(b.input_info(node).shape)
    for axis, (begin, end) in enumerate(zip(begins, ends)):
        if not begin and not end:
            continue
        parts = []
        for side, size in (("begin", begin), ("end", end)):
            if size:
                zeros = np.zeros(shape[:axis] + [size] + shape[axis + 1:], dtype=np.float32)
                parts.append(b.constant(f"{node.name}.{side}{axis}_zeros", zeros))
        parts.insert(1 if begin else 0, source)
        source = f"{node.name}.axis{axis}"
        b.op("Concat", parts, source, axis=axis)
        shape[axis] += begin + end
    b.env[node] = source


def emit_pad_call(b: Builder, node: fx.Node, module: None) -> None:
    """`F.pad` left a call at prepare because its amounts come from sizes (`x.size(2) - ...`,
    U-Net's crop-to-fit): they are constants at export's static shapes."""
    pad, mode, value = b.call_arguments(node, ("pad", "mode", "value"))
    if not all(isinstance(amount, int) for amount in pad):
        raise ExportError(f"pad '{node.name}' pads by amounts computed from a tensor's values; "
                          "export needs amounts known from the shapes.")
    emit_pad(b, node, SimpleNamespace(pad=tuple(pad), mode=mode or "constant",
                                      value=float(value or 0.0), target=node.name))


def emit_pad(b: Builder, node: fx.Node, module: Any) -> None:
    """F.pad / nn.*Pad*d as ONNX Pad: torch lists (begin, end) pairs from the last dim back,
    ONNX all begins then all ends, first dim first."""
    rank = len(b.input_info(node).shape)
    pairs = [module.pad[index:index + 2] for index in range(0, len(module.pad), 2)]
    begins, ends = [0] * rank, [0] * rank
    for offset, (begin, end) in enumerate(pairs):
        begins[rank - 1 - offset], ends[rank - 1 - offset] = begin, end
    mode = ONNX_PAD_MODES[module.mode]
    if mode == "wrap" and b.opset < WRAP_PAD_OPSET:
        raise ExportError(f"circular pad '{node.target}' needs opset >= {WRAP_PAD_OPSET}; "
                          f"export with opset={WRAP_PAD_OPSET}.")
    padded = {axis for axis in range(rank) if begins[axis] or ends[axis]}
    if (mode == "constant" and not getattr(module, "value", 0.0) and rank >= 3
            and not padded <= {rank - 2, rank - 1} and padded <= {rank - 3, rank - 2}):
        _pad_by_concat(b, node, begins, ends)
        return
    inputs = [b.tensor_input(node), b.int64_constant(f"{node.name}.pads", begins + ends)]
    if getattr(module, "value", 0.0):
        inputs.append(b.float_constant(f"{node.name}.value", module.value))
    b.emit(node, "Pad", inputs, mode=mode)
