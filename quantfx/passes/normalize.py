"""Functionals and tensor ops become modules, one instance per call site (and a few modules
become stand-ins that compute in the float steps of the ONNX op they export as).

Driven by a plain table of rewrites (`REWRITES`): which callables or Tensor methods a row
covers, the names of their non-tensor arguments, and how to build the module from them.
A call whose arguments cannot be baked into a module (a size computed at run time that is
not a tensor shape, an `out=` argument) is left as it is; placement still quantizes its output.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from quantfx import modules as standins
from quantfx.passes.graph_utils import (
    is_float_tensor,
    module_of,
    replace_with_module,
    set_inplace_false,
    set_submodule,
    unique_submodule_name,
)

UNARY, BINARY, VARIADIC = "unary", "binary", "variadic"


@dataclass(frozen=True)
class Rewrite:
    """One row of the table: `targets` (functions or method names) → `build(arguments)`."""

    targets: tuple[Callable | str, ...]
    params: tuple[str, ...]
    build: Callable[[dict[str, Any]], nn.Module]
    kind: str = UNARY
    runtime_params: tuple[str, ...] = ()


def _get(arguments: dict[str, Any], name: str, default: Any) -> Any:
    value = arguments.get(name, default)
    return default if value is None and default is not None else value


def _same_keywords(module_cls: type[nn.Module], **defaults: Any) -> Callable[..., nn.Module]:
    """A builder for a module whose keywords are the functional's: `kernel_size` as given,
    each keyword of `defaults` as given or its default."""
    return lambda a: module_cls(
        kernel_size=a["kernel_size"],
        **{name: _get(a, name, default) for name, default in defaults.items()},
    )


REWRITES: tuple[Rewrite, ...] = (
    Rewrite(
        (F.relu, torch.relu, torch.relu_, F.relu_, "relu", "relu_"),
        ("inplace",),
        lambda a: nn.ReLU(),
    ),
    Rewrite((F.relu6,), ("inplace",), lambda a: nn.ReLU6()),
    Rewrite(
        (F.hardtanh, F.hardtanh_),
        ("min_val", "max_val", "inplace"),
        lambda a: nn.Hardtanh(_get(a, "min_val", -1.0), _get(a, "max_val", 1.0)),
    ),
    Rewrite((F.hardswish, "hardswish"), ("inplace",), lambda a: standins.HardSwish()),
    Rewrite((F.hardsigmoid, "hardsigmoid"), ("inplace",), lambda a: standins.HardSigmoid()),
    Rewrite((torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_"), (), lambda a: nn.Sigmoid()),
    Rewrite((torch.tanh, F.tanh, "tanh", "tanh_"), (), lambda a: nn.Tanh()),
    Rewrite((F.silu, "silu"), ("inplace",), lambda a: nn.SiLU()),
    Rewrite((F.gelu,), ("approximate",), lambda a: nn.GELU(_get(a, "approximate", "none"))),
    Rewrite(
        (F.leaky_relu, F.leaky_relu_),
        ("negative_slope", "inplace"),
        lambda a: nn.LeakyReLU(_get(a, "negative_slope", 0.01)),
    ),
    Rewrite((F.softmax, torch.softmax, "softmax"), ("dim",), lambda a: nn.Softmax(a.get("dim"))),
    Rewrite((F.pad,), ("pad", "mode", "value"),
            lambda a: pad_module(a["pad"], _get(a, "mode", "constant"), a.get("value"))),
    Rewrite((operator.add, operator.iadd, torch.add, "add", "add_"), (),
            lambda a: standins.Add(), BINARY),
    Rewrite((operator.sub, operator.isub, torch.sub, "sub", "sub_"), (),
            lambda a: standins.Sub(), BINARY),
    Rewrite((operator.mul, operator.imul, torch.mul, "mul", "mul_"), (),
            lambda a: standins.Mul(), BINARY),
    Rewrite(
        (torch.cat, torch.concat, torch.concatenate),
        ("dim",),
        lambda a: standins.Cat(_get(a, "dim", _get(a, "axis", 0))),
        VARIADIC,
    ),
    Rewrite((torch.stack,), ("dim",), lambda a: standins.Stack(_get(a, "dim", 0)), VARIADIC),
    Rewrite(
        (torch.flatten, "flatten"),
        ("start_dim", "end_dim"),
        lambda a: nn.Flatten(_get(a, "start_dim", 0), _get(a, "end_dim", -1)),
    ),
    Rewrite(
        (F.adaptive_avg_pool1d,), ("output_size",), lambda a: nn.AdaptiveAvgPool1d(a["output_size"])
    ),
    Rewrite(
        (F.adaptive_avg_pool2d,), ("output_size",), lambda a: nn.AdaptiveAvgPool2d(a["output_size"])
    ),
    Rewrite(
        (F.adaptive_max_pool2d,),
        ("output_size", "return_indices"),
        lambda a: nn.AdaptiveMaxPool2d(a["output_size"]),
    ),
    Rewrite(
        (F.avg_pool2d,),
        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
        _same_keywords(nn.AvgPool2d, stride=None, padding=0, ceil_mode=False,
                       count_include_pad=True, divisor_override=None),
    ),
    Rewrite(
        (F.max_pool2d,),
        ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
        _same_keywords(nn.MaxPool2d, stride=None, padding=0, dilation=1, ceil_mode=False),
    ),
    Rewrite(
        (torch.mean, "mean"),
        ("dim", "keepdim"),
        lambda a: standins.Mean(a.get("dim"), _get(a, "keepdim", False)),
    ),
    Rewrite(
        (torch.sum, "sum"),
        ("dim", "keepdim"),
        lambda a: standins.Sum(a.get("dim"), _get(a, "keepdim", False)),
    ),
    Rewrite(
        (F.interpolate,),
        ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias"),
        lambda a: standins.Interpolate(
            None,
            a.get("scale_factor"),
            _get(a, "mode", "nearest"),
            a.get("align_corners"),
            a.get("recompute_scale_factor"),
            _get(a, "antialias", False),
        ),
        runtime_params=("size",),
    ),
)

PAD_MODES = {nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect",
             nn.ReflectionPad3d: "reflect", nn.ReplicationPad1d: "replicate",
             nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate",
             nn.CircularPad1d: "circular", nn.CircularPad2d: "circular",
             nn.CircularPad3d: "circular", nn.ZeroPad1d: "constant", nn.ZeroPad2d: "constant",
             nn.ZeroPad3d: "constant", nn.ConstantPad1d: "constant",
             nn.ConstantPad2d: "constant", nn.ConstantPad3d: "constant"}
"""torch's padding modules and the F.pad mode each is."""


def pad_module(pad: tuple[int, ...], mode: str, value: float | None) -> nn.Module:
    """The stand-in of one padding: shape-only unless it fills with a non-zero constant."""
    if mode == "constant" and value not in (None, 0, 0.0):
        return standins.ConstantPad(pad, value)
    return standins.Pad(pad, mode)


MODULE_REWRITES: dict[type[nn.Module], Callable[[nn.Module], nn.Module]] = {
    nn.Hardswish: lambda module: standins.HardSwish(),
    nn.Hardsigmoid: lambda module: standins.HardSigmoid(),
    **{kind: lambda module: pad_module(module.padding, PAD_MODES[type(module)],
                                       getattr(module, "value", 0.0)) for kind in PAD_MODES},
    **{kind: lambda module: standins.Interpolate(
        module.size, module.scale_factor, module.mode, module.align_corners,
        module.recompute_scale_factor) for kind in (nn.Upsample, nn.UpsamplingNearest2d,
                                                    nn.UpsamplingBilinear2d)},
}
"""Modules replaced by a stand-in that computes the same function in the float steps of the
single ONNX op it exports as (so the file needs no float intermediate tensors)."""

_BY_TARGET: dict[Any, Rewrite] = {}
for _rewrite in REWRITES:
    for _target in _rewrite.targets:
        _BY_TARGET[_target] = _rewrite

# Arguments that must keep their default for the rewrite to be exact.
_MUST_BE_DEFAULT = {
    "return_indices": (None, False),
    "alpha": (None, 1),
    "out": (None,),
    "dtype": (None,),
}
_IGNORED_KEYWORDS = {"_stacklevel"}
"""Keywords that change nothing computed (F.softmax records `_stacklevel=3` when traced)."""
_TENSOR_KEYWORDS = ("input", "self", "tensors", "other")


def _rule_for(node: fx.Node) -> Rewrite | None:
    if node.op == "call_function":
        return _BY_TARGET.get(node.target)
    if node.op == "call_method" and isinstance(node.target, str):
        return _BY_TARGET.get(node.target)
    return None


def _bind(node: fx.Node, rule: Rewrite) -> tuple[tuple, dict[str, Any]] | None:
    """Split a call into (operands, named options); None if it cannot become a module."""
    operand_count = 2 if rule.kind == BINARY else 1
    args = list(node.args)
    kwargs = dict(node.kwargs)
    operands = args[:operand_count]
    for keyword in _TENSOR_KEYWORDS:
        if keyword in kwargs and len(operands) < operand_count:
            operands.append(kwargs.pop(keyword))
    if len(operands) != operand_count:
        return None
    options = dict(zip(rule.params, args[operand_count:]))
    if len(args) - operand_count > len(rule.params):
        return None
    for name, value in kwargs.items():
        if name in _IGNORED_KEYWORDS:
            continue
        if name not in rule.params and name not in _MUST_BE_DEFAULT and name != "axis":
            return None
        options[name] = value
    for name, allowed in _MUST_BE_DEFAULT.items():
        if name in options and options[name] not in allowed:
            return None
    if rule.kind == VARIADIC:
        tensors = operands[0]
        if not isinstance(tensors, (list, tuple)) or not all(map(is_float_tensor, tensors)):
            return None
        operands = list(tensors)
    elif rule.kind == BINARY:
        if not any(map(is_float_tensor, operands)):
            return None
        if any(isinstance(op, fx.Node) and not is_float_tensor(op) for op in operands):
            return None
    elif not is_float_tensor(operands[0]):
        return None
    runtime = [options.pop(name, None) for name in rule.runtime_params]
    if _holds_node(options):
        return None
    while runtime and runtime[-1] is None:
        runtime.pop()
    return tuple(operands) + tuple(runtime), options


def _holds_node(value: Any) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def explicit_conv_padding(graph_module: fx.GraphModule) -> None:
    """A conv with padding_mode reflect/replicate/circular becomes a `Pad` (shape-only, exported
    as ONNX Pad) before the same conv with zero padding, which is what ONNX Conv can do."""
    convs = [node for node in graph_module.graph.nodes
             if isinstance(module_of(graph_module, node), nn.modules.conv._ConvNd)
             and module_of(graph_module, node).padding_mode != "zeros"]
    pads: dict[int, standins.Pad] = {}
    for node in convs:
        conv = module_of(graph_module, node)
        if id(conv) not in pads:  # the first call site of a shared conv changes it
            pads[id(conv)] = standins.Pad(conv._reversed_padding_repeated_twice,
                                          PADDING_MODES[conv.padding_mode])
            conv.padding_mode = "zeros"
            conv.padding = (0,) * len(conv.kernel_size)
        name = unique_submodule_name(graph_module, f"{node.target}_pad")
        graph_module.add_submodule(name, copy.copy(pads[id(conv)]))
        with graph_module.graph.inserting_before(node):
            padded = graph_module.graph.call_module(name, (node.args[0],))
        node.args = (padded, *node.args[1:])


PADDING_MODES = {"reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def numeric_conv_padding(graph_module: fx.GraphModule) -> None:
    """A conv with padding "valid", or "same" that pads both sides alike (odd kernel extents),
    gets the same padding as numbers: folding, error feedback and learned rounding work on
    numeric padding (a Keras-style `Conv2d(..., padding="valid")` is a conv without padding)."""
    for node in graph_module.graph.nodes:
        conv = module_of(graph_module, node)
        if not isinstance(conv, nn.modules.conv._ConvNd) or not isinstance(conv.padding, str):
            continue
        totals = [dilation * (kernel - 1)
                  for dilation, kernel in zip(conv.dilation, conv.kernel_size)]
        if conv.padding == "valid":
            conv.padding = (0,) * len(totals)
        elif all(total % 2 == 0 for total in totals):
            conv.padding = tuple(total // 2 for total in totals)


SEQUENCE_CALLS = (torch.cat, torch.concat, torch.concatenate, torch.stack)
"""Calls that take a sequence of tensors, which may be one node (`torch.cat(x.chunk(2))`)."""


def spread_tensor_sequences(graph_module: fx.GraphModule) -> None:
    """`torch.cat(parts)` where `parts` is one node yielding tensors (chunk, split, a slice of
    them) becomes `torch.cat([parts[0], parts[1], ...])`, which the Cat rewrite takes."""
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target not in SEQUENCE_CALLS or not node.args:
            continue
        sequence = node.args[0]
        meta = sequence.meta.get("tensor_meta") if isinstance(sequence, fx.Node) else None
        if not isinstance(meta, (list, tuple)) or isinstance(meta, TensorMetadata):
            continue
        items = []
        with graph_module.graph.inserting_before(node):
            for index, item_meta in enumerate(meta):
                item = graph_module.graph.call_function(operator.getitem, (sequence, index))
                item.meta["tensor_meta"] = item_meta
                items.append(item)
        node.args = (items, *node.args[1:])


def functionals_to_modules(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Replace every tabled functional / Tensor-method call by a call of a fresh module.

    Also makes every module in the graph out-of-place (`inplace=False`): a quantizer's input
    must not be overwritten by an in-place activation that follows it.
    """
    for module in graph_module.modules():
        set_inplace_false(module)
    explicit_conv_padding(graph_module)
    numeric_conv_padding(graph_module)
    spread_tensor_sequences(graph_module)
    for node in list(graph_module.graph.nodes):
        module = module_of(graph_module, node)
        if type(module) in MODULE_REWRITES:
            set_submodule(graph_module, node.target, MODULE_REWRITES[type(module)](module))
            continue
        rule = _rule_for(node)
        if rule is None or not is_float_tensor(node):
            continue
        bound = _bind(node, rule)
        if bound is None:
            continue
        operands, options = bound
        replace_with_module(graph_module, node, rule.build(options), operands)
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module
