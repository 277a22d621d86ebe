"""Shape-only ops that select values: indexing and slicing, split / chunk / unbind, narrow,
flip and roll (Slice, Split, Concat: TIDL runs Slice and Split without Q/DQ)."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from quantfx.errors import ExportError, InternalError
from quantfx.export.builder import END, Builder


def emit_split(b: Builder, node: fx.Node, module: Any) -> None:
    """split / chunk: one Split into the pieces the converted model produced."""
    in_shape = b.input_info(node).shape
    pieces = b.records[node]
    args = [b.value(arg) for arg in node.args[1:]]
    dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
    axis = int(dim) % len(in_shape)
    outputs = [f"{node.name}.{index}" for index in range(len(pieces))]
    b.split(node.name, b.tensor_input(node), outputs, axis,
            [piece.shape[axis] for piece in pieces])
    b.env[node] = outputs


def emit_unbind(b: Builder, node: fx.Node, module: Any) -> None:
    shape = b.input_info(node).shape
    (dim,) = b.call_arguments(node, ("dim",))
    axis = (dim or 0) % len(shape)
    pieces = [f"{node.name}.piece{index}" for index in range(shape[axis])]
    b.split(node.name, b.tensor_input(node), pieces, axis, [1] * shape[axis])
    outputs = []
    for index, (piece, record) in enumerate(zip(pieces, b.records[node])):
        output = f"{node.name}.{index}"
        b.reshape(output, piece, output, record.shape)
        outputs.append(output)
    b.env[node] = outputs


def emit_narrow(b: Builder, node: fx.Node, module: Any) -> None:
    shape = b.input_info(node).shape
    dim, start, length = b.call_arguments(node, ("dim", "start", "length"))
    axis = dim % len(shape)
    start %= shape[axis]
    b.slice(node.name, b.tensor_input(node), [start], [start + length], [axis])
    b.env[node] = node.name


def emit_flip(b: Builder, node: fx.Node, module: Any) -> None:
    shape = b.input_info(node).shape
    (dims,) = b.call_arguments(node, ("dims",))
    dims = [dims] if isinstance(dims, int) else list(dims)
    axes = [dim % len(shape) for dim in dims]
    b.slice(node.name, b.tensor_input(node), [-1] * len(axes), [-END] * len(axes), axes,
            [-1] * len(axes))
    b.env[node] = node.name


def emit_roll(b: Builder, node: fx.Node, module: Any) -> None:
    shape = b.input_info(node).shape
    shifts, dims = b.call_arguments(node, ("shifts", "dims"))
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        raise ExportError(f"roll '{node.name}' without dims (a roll of the flattened tensor) "
                          "does not export; give dims.")
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    dims = [dims] if isinstance(dims, int) else list(dims)
    b.env[node] = b.roll(node.name, b.tensor_input(node), shape, shifts,
                         [dim % len(shape) for dim in dims])


def emit_getitem(b: Builder, node: fx.Node, module: Any) -> None:
    """`x[index]` on a tensor (basic indexing), or picking one output of a multi-output op."""
    container = b.value(node.args[0])
    index = b.value(node.args[1])
    if isinstance(container, (list, tuple)):
        b.env[node] = container[index]
        return
    if not isinstance(container, str):
        raise InternalError(f"getitem '{node.name}' on a non-tensor reached the emitter.")
    _emit_indexing(b, node, container, index)


def _emit_indexing(b: Builder, node: fx.Node, source: str, index: Any) -> None:
    """Basic tensor indexing (ints, slices with positive steps, None, Ellipsis) as
    Slice + Reshape to the recorded static shape."""
    in_shape = b.input_info(node).shape
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (item is None or item is Ellipsis or isinstance(item, (int, slice)))
           for item in items):
        raise ExportError(f"indexing '{node.name}' uses {index!r}; only ints, slices, None and "
                          "... export (no tensor indices).")
    if Ellipsis in items:
        position = items.index(Ellipsis)
        explicit = sum(1 for item in items if item is not None and item is not Ellipsis)
        items[position:position + 1] = [slice(None)] * (len(in_shape) - explicit)
    starts, ends, axes, steps = [], [], [], []
    dim = 0
    for item in items:
        if item is None:
            continue
        size = in_shape[dim]
        if isinstance(item, int):
            start = item % size
            starts.append(start)
            ends.append(start + 1)
            axes.append(dim)
            steps.append(1)
        elif item != slice(None):
            if not all(bound is None or isinstance(bound, int)
                       for bound in (item.start, item.stop, item.step)):
                raise ExportError(
                    f"indexing '{node.name}' slices with a bound computed from a tensor's "
                    "values; ONNX export needs bounds known from the shapes (sizes and shape "
                    "arithmetic fold to constants).")
            start, stop, step = item.indices(size)
            if step <= 0:
                raise ExportError(f"indexing '{node.name}' uses a non-positive step.")
            starts.append(start)
            ends.append(stop)
            axes.append(dim)
            steps.append(step)
        dim += 1
    current = source
    if axes:
        current = b.slice(f"{node.name}.slice", source, starts, ends, axes, steps,
                          prefix=node.name)
    b.reshape(node.name, current, node.name, b.info(node).shape)
    b.env[node] = node.name
