"""Small helpers every pass uses: module lookup and replacement, node classification, and the
one answer to "which quantizer's grid does this value lie on" (for convert, QAT and export)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from quantfx.ops import SHAPE_ONLY_FUNCTIONS, SHAPE_ONLY_METHODS, SHAPE_ONLY_MODULES
from quantfx.quantizers import Quantizer


def module_of(graph_module: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a `call_module` node calls, or None for other nodes."""
    if node.op != "call_module":
        return None
    return graph_module.get_submodule(node.target)


def set_submodule(graph_module: nn.Module, target: str, module: nn.Module) -> None:
    """Replace (or add) the submodule at dotted path `target`."""
    owner, _, name = target.rpartition(".")
    parent = graph_module.get_submodule(owner) if owner else graph_module
    setattr(parent, name, module)


def fetch_attribute(graph_module: nn.Module, target: str) -> Any:
    """The attribute at dotted path `target` (what a `get_attr` node reads)."""
    owner, _, name = target.rpartition(".")
    parent = graph_module.get_submodule(owner) if owner else graph_module
    return getattr(parent, name)


def is_float_tensor(node: Any) -> bool:
    """True when `node` is a graph node whose recorded value is a floating-point tensor."""
    if not isinstance(node, fx.Node):
        return False
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point


def recorded_shape(node: Any) -> tuple[int, ...] | None:
    """The shape shape propagation recorded for `node` (None: not a node, or not a tensor)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


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


def first_input(node: fx.Node) -> fx.Node | None:
    """The first argument of `node` that is a graph node (the data input of most ops)."""
    found: list[fx.Node] = []
    fx.node.map_arg(node.args, found.append)
    return found[0] if found else None


def parameter_free_nodes(graph_module: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose values depend on no parameter of the model: its inputs, buffers and
    constants and what is computed from them alone. No gradient of the loss reaches them."""
    free: set[fx.Node] = set()
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            owns = isinstance(fetch_attribute(graph_module, node.target), nn.Parameter)
        else:
            module = module_of(graph_module, node)
            owns = module is not None and any(True for _ in module.parameters())
        if not owns and all(source in free for source in node.all_input_nodes):
            free.add(node)
    return free


def is_shape_only(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that only move, select or copy values: their output is on their input's grid."""
    if node.op == "call_module":
        return isinstance(module_of(graph_module, node), SHAPE_ONLY_MODULES)
    if node.op == "call_function":
        return node.target in SHAPE_ONLY_FUNCTIONS
    if node.op == "call_method":
        return node.target in SHAPE_ONLY_METHODS
    return False


def grid_quantizer(graph_module: fx.GraphModule, value: Any) -> Quantizer | None:
    """The quantizer whose grid `value` lies on: its own node's, or that of the quantizer
    before the shape-only ops that produced it; None when it is on no quantizer's grid."""
    while isinstance(value, fx.Node):
        module = module_of(graph_module, value)
        if isinstance(module, Quantizer):
            return module
        if not is_shape_only(graph_module, value):
            return None
        value = first_input(value)
    return None


def input_quantizer(graph_module: fx.GraphModule, node: fx.Node) -> Quantizer | None:
    """The quantizer of the data input of layer `node` (None if it is not quantized)."""
    return grid_quantizer(graph_module, first_input(node))


def flatten_values(value: Any) -> list[Any]:
    """The leaves of nested tuples, lists and dicts (a model's outputs), in order."""
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in flatten_values(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in flatten_values(item)]
    return [value]


def builds_a_tuple(node: Any) -> bool:
    """A call of a namedtuple class (a model returning one): a container, not an op."""
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and isinstance(node.target, type) and issubclass(node.target, tuple)
            and not node.kwargs)


def output_values(graph_module: fx.GraphModule) -> list[Any]:
    """The model's outputs, flattened as the outputs of a call are (namedtuples included)."""
    output = next(node for node in graph_module.graph.nodes if node.op == "output")

    def leaves(value: Any) -> list[Any]:
        if builds_a_tuple(value):
            return [leaf for arg in value.args for leaf in leaves(arg)]
        return [leaf for item in flatten_values(value) for leaf in
                (leaves(item) if builds_a_tuple(item) else [item])]

    return leaves(output.args[0])


def output_quantizers(graph_module: fx.GraphModule) -> list[Quantizer | None]:
    """The quantizer each model output lies on (through shape-only ops), or None."""
    return [grid_quantizer(graph_module, value) for value in output_values(graph_module)]


def constant_value(graph_module: fx.GraphModule, value: Any) -> Any:
    """The value of `value` when it is computed from parameters and buffers only (evaluated
    node by node); `LookupError` when it depends on a model input."""
    if not isinstance(value, fx.Node):
        return value
    if value.op == "get_attr":
        return fetch_attribute(graph_module, value.target)
    if value.op not in ("call_function", "call_method", "call_module"):
        raise LookupError(f"'{value.name}' depends on the model's inputs")
    args = fx.node.map_arg(value.args, lambda node: constant_value(graph_module, node))
    kwargs = fx.node.map_arg(value.kwargs, lambda node: constant_value(graph_module, node))
    with torch.no_grad():
        if value.op == "call_function":
            return value.target(*args, **kwargs)
        if value.op == "call_method":
            return getattr(args[0], value.target)(*args[1:], **kwargs)
        return graph_module.get_submodule(value.target)(*args, **kwargs)


class _ChildrenAsLeaves(fx.Tracer):
    """Traces a module's own forward only: its submodules stay calls."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


def inline_module(graph_module: fx.GraphModule, node: fx.Node, pieces: nn.Module, target: str,
                  inputs: tuple[Any, ...], names: dict[str, str]) -> Any:
    """Copy `pieces`' traced graph in place of `node` (`pieces` registered at `target`), its
    nodes named `{node.name}_{names.get(inner name, inner name)}`; returns its output (nodes).
    `node` itself is left for the caller to replace."""
    graph = graph_module.graph
    traced = _ChildrenAsLeaves().trace(pieces)
    copies: dict[fx.Node, Any] = {}
    placeholders = iter(inputs)
    result: Any = None
    with graph.inserting_before(node):
        for inner in traced.nodes:
            if inner.op == "placeholder":
                copies[inner] = next(placeholders)
            elif inner.op == "output":
                result = fx.node.map_arg(inner.args[0], copies.__getitem__)
            else:
                copies[inner] = graph.create_node(
                    inner.op,
                    f"{target}.{inner.target}" if inner.op in ("call_module", "get_attr")
                    else inner.target,
                    fx.node.map_arg(inner.args, copies.__getitem__),
                    fx.node.map_arg(inner.kwargs, copies.__getitem__),
                    name=f"{node.name}_{names.get(inner.name, inner.name)}")
    return result
