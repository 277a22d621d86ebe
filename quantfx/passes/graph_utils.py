"""Small helpers every pass uses: node classification and module lookup."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata


def module_of(graph_module: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a `call_module` node calls, or None for other nodes."""
    if node.op != "call_module":
        return None
    return graph_module.get_submodule(node.target)


def is_float_tensor(node: Any) -> bool:
    """True when `node` is a graph node whose recorded value is a floating-point tensor."""
    if not isinstance(node, fx.Node):
        return False
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point


def unique_submodule_name(graph_module: fx.GraphModule, wanted: str) -> str:
    """`wanted` (dots allowed), or with a numeric suffix if that attribute path is taken."""

    def taken(path: str) -> bool:
        try:
            graph_module.get_submodule(path)
            return True
        except AttributeError:
            owner, _, leaf = path.rpartition(".")
            try:
                parent = graph_module.get_submodule(owner) if owner else graph_module
            except AttributeError:
                return False
            return hasattr(parent, leaf)

    if not taken(wanted):
        return wanted
    index = 1
    while taken(f"{wanted}_{index}"):
        index += 1
    return f"{wanted}_{index}"


def replace_with_module(
    graph_module: fx.GraphModule,
    node: fx.Node,
    module: nn.Module,
    args: tuple,
    name: str | None = None,
) -> fx.Node:
    """Turn `node` into a call of `module` on `args`, keeping the node's name and users.

    The module is registered under the node's name, so graph, module and (later) ONNX names
    all agree.
    """
    target = unique_submodule_name(graph_module, name or node.name)
    graph_module.add_submodule(target, module)
    node.op = "call_module"
    node.target = target
    node.args = tuple(args)
    node.kwargs = {}
    return node


def set_inplace_false(module: nn.Module) -> None:
    """Make activations out-of-place so no quantizer's input is overwritten behind its back."""
    if hasattr(module, "inplace") and isinstance(module.inplace, bool):
        module.inplace = False
