"""Functionals that take a model's own parameters become the module that owns them.

`F.conv1d/2d/3d(x, self.weight, self.bias, ...)`, `F.linear(x, self.weight, self.bias)` and
`F.layer_norm(x, shape, self.weight, self.bias)` (a bare `nn.Conv2d` traced as the root model
is one of these, too) become `nn.Conv*d` / `nn.Linear` / `nn.LayerNorm` modules that *share*
the Parameter objects: conv and linear then get quantized weights like any layer, and
training updates the model's own parameters. Calls whose weights are computed at run time
stay as they are.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from quantfx.passes.graph_utils import fetch_attribute, is_float_tensor, replace_with_module

_CONVS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _holds_node(value: Any) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _parameters(graph_module: fx.GraphModule, *args: Any) -> list[Any] | None:
    """The Parameters behind get_attr nodes (None stays None); None if one is computed."""
    values = []
    for arg in args:
        if arg is None:
            values.append(None)
        elif isinstance(arg, fx.Node) and arg.op == "get_attr":
            value = fetch_attribute(graph_module, arg.target)
            if not isinstance(value, nn.Parameter):
                return None
            values.append(value)
        else:
            return None
    return values


def _replace(graph_module: fx.GraphModule, node: fx.Node, module: nn.Module, source: fx.Node,
             attributes: dict[str, Any]) -> None:
    for attribute, value in attributes.items():
        setattr(module, attribute, value)
    replace_with_module(graph_module, node, module, (source,))
    for arg in list(graph_module.graph.nodes):
        if arg.op == "get_attr" and not arg.users:
            graph_module.graph.erase_node(arg)


def _conv_to_module(graph_module: fx.GraphModule, node: fx.Node) -> None:
    bound = dict(zip(_CONV_ARGUMENTS, node.args)) | dict(node.kwargs)
    source = bound.get("input")
    found = _parameters(graph_module, bound.get("weight"), bound.get("bias"))
    options = {name: bound.get(name) for name in _CONV_ARGUMENTS[3:] if name in bound}
    if found is None or not is_float_tensor(source) or _holds_node(options):
        return
    weight, bias = found
    groups = options.get("groups", 1)
    conv = _CONVS[node.target](
        weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
        stride=options.get("stride", 1), padding=options.get("padding", 0),
        dilation=options.get("dilation", 1), groups=groups, bias=bias is not None,
        device="meta")
    _replace(graph_module, node, conv, source, {"weight": weight, "bias": bias})


def _linear_to_module(graph_module: fx.GraphModule, node: fx.Node) -> None:
    bound = dict(zip(("input", "weight", "bias"), node.args)) | dict(node.kwargs)
    source = bound.get("input")
    found = _parameters(graph_module, bound.get("weight"), bound.get("bias"))
    if found is None or not is_float_tensor(source):
        return
    weight, bias = found
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    _replace(graph_module, node, linear, source, {"weight": weight, "bias": bias})


def _layer_norm_to_module(graph_module: fx.GraphModule, node: fx.Node) -> None:
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    source, shape = bound.get("input"), bound.get("normalized_shape")
    found = _parameters(graph_module, bound.get("weight"), bound.get("bias"))
    if found is None or not is_float_tensor(source) or not isinstance(shape, (list, tuple, int)):
        return
    if _holds_node(shape):  # e.g. (x.shape[-1],): the trailing dims of the traced input
        count = 1 if isinstance(shape, int) else len(shape)
        shape = tuple(source.meta["tensor_meta"].shape[-count:])
    weight, bias = found
    norm = nn.LayerNorm(shape, eps=bound.get("eps", 1e-5), elementwise_affine=weight is not None
                        or bias is not None, bias=bias is not None, device="meta")
    _replace(graph_module, node, norm, source, {"weight": weight, "bias": bias})


REWRITES = {**{conv: _conv_to_module for conv in _CONVS}, F.linear: _linear_to_module,
            F.layer_norm: _layer_norm_to_module}
"""Function -> the rewrite of its calls into a parameter-sharing module."""


def functional_layers_to_modules(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every tabled functional called on the model's own parameters (see the top)."""
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and node.target in REWRITES:
            REWRITES[node.target](graph_module, node)
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module

