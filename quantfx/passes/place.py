"""Quantizer placement per the numerics contract (DESIGN.md).

Every float tensor the engine holds gets a quantizer: network inputs, each layer's output after
its fused activation, elementwise ops, concat, pooling, resize, activation functions and any op
quantfx does not know. Shape-only ops (flatten, reshape, max-pool, dropout, ...) keep the
quantization of their input. A quantizer is unsigned when its tensor is provably non-negative.
Weights of conv/linear layers get their own quantizer inside a `QuantLayer`.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from quantfx import modules as qm
from quantfx.config import LAYER_ALIASES, QuantConfig
from quantfx.errors import ConfigError
from quantfx.fake_quant import FakeQuantize
from quantfx.observers import make_observer
from quantfx.passes.graph_utils import is_float_tensor, module_of, unique_submodule_name
from quantfx.qmath import qrange

QUANTIZER_PREFIX = "quantizers"

FUSABLE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
"""Clipping activations an engine executes inside the preceding layer."""
FUSE_PRODUCERS = qm.WEIGHT_LAYERS + (
    qm.QuantLayer,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    qm.Add,
)
"""Ops whose output is not quantized when their only user is a fusable activation."""

SHAPE_ONLY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Flatten,
    nn.Unflatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
)
SHAPE_ONLY_FUNCTIONS: set[Callable] = {
    operator.getitem,
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.swapaxes,
    torch.swapdims,
    torch.squeeze,
    torch.unsqueeze,
    torch.chunk,
    torch.split,
    torch.narrow,
    torch.flip,
    torch.roll,
    torch.t,
    torch.unbind,
    torch.movedim,
    torch.clone,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.pixel_shuffle,
    F.pixel_unshuffle,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    torch.channel_shuffle,
}
SHAPE_ONLY_METHODS = {
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "swapaxes",
    "swapdims",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "chunk",
    "split",
    "unbind",
    "narrow",
    "repeat",
    "t",
    "flip",
    "roll",
    "clone",
    "detach",
    "view_as",
    "reshape_as",
    "movedim",
    "unflatten",
    "__getitem__",
}
try:  # torchvision's stochastic depth is identity in eval and a leaf module by default
    from torchvision.ops import StochasticDepth

    SHAPE_ONLY_MODULES += (StochasticDepth,)
except ImportError:  # pragma: no cover
    pass

NONNEGATIVE_OUTPUT_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
"""Modules whose output is non-negative whatever their input."""
ORDER_PRESERVING_MODULES = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    qm.Mean,
    qm.Cat,
    qm.Stack,
    qm.Add,
    qm.Mul,
    FakeQuantize,
)
"""Modules whose output is non-negative when all their tensor inputs are."""


def is_shape_only(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that only move, select or copy values: their output is on their input's grid."""
    if node.op == "call_module":
        return isinstance(module_of(graph_module, node), SHAPE_ONLY_MODULES)
    if node.op == "call_function":
        return node.target in SHAPE_ONLY_FUNCTIONS
    if node.op == "call_method":
        return node.target in SHAPE_ONLY_METHODS
    return False


def first_input(node: fx.Node) -> fx.Node | None:
    """The first argument of `node` that is a graph node (the data input of most ops)."""
    found: list[fx.Node] = []
    fx.node.map_arg(node.args, found.append)
    return found[0] if found else None


def input_quantizer(
    graph_module: fx.GraphModule, node: fx.Node, kinds: type | tuple[type, ...]
) -> nn.Module | None:
    """The quantizer (of type `kinds`) whose grid `node`'s data input lies on, looking back
    through shape-only ops; None when the input is not on a quantizer's grid."""
    source = first_input(node)
    while source is not None and not isinstance(module_of(graph_module, source), kinds):
        if not is_shape_only(graph_module, source):
            return None
        source = first_input(source)
    return None if source is None else module_of(graph_module, source)


MONOTONE_RESIZE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area")
"""Resize modes that never leave the range of their input (bicubic overshoots)."""


def _carries_tensors(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return is_float_tensor(node) or isinstance(meta, (tuple, list))


def _is_nonnegative(
    graph_module: fx.GraphModule, node: fx.Node, nonneg: set[fx.Node], config: QuantConfig
) -> bool:
    """Whether `node`'s output is provably >= 0, from op semantics (never from data)."""
    if node.op == "placeholder":
        return config.nonnegative_inputs
    module = module_of(graph_module, node)
    if isinstance(module, NONNEGATIVE_OUTPUT_MODULES):
        return True
    if isinstance(module, nn.Hardtanh):
        return module.min_val >= 0
    if isinstance(module, qm.Interpolate) and module.mode not in MONOTONE_RESIZE_MODES:
        return False
    if isinstance(module, (qm.Add, qm.Mul)):
        numbers = [arg for arg in node.args if isinstance(arg, (int, float))]
        if any(number < 0 for number in numbers):
            return False
    elif not (
        isinstance(module, ORDER_PRESERVING_MODULES + (qm.Interpolate,))
        or is_shape_only(graph_module, node)
    ):
        return False
    inputs: list[fx.Node] = []
    fx.node.map_arg(node.args, inputs.append)
    data = [arg for arg in inputs if _carries_tensors(arg)]
    return bool(data) and all(arg in nonneg for arg in data)


def _fused_into_activation(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """True when `node` is a layer whose only user is a clipping activation fused into it."""
    if not isinstance(module_of(graph_module, node), FUSE_PRODUCERS) or len(node.users) != 1:
        return False
    user = next(iter(node.users))
    return isinstance(module_of(graph_module, user), FUSABLE_ACTIVATIONS)


def weight_quantizer(
    layer: nn.Module, config: QuantConfig, observer_kind: str | None = None
) -> FakeQuantize:
    """The weight quantizer of a conv/linear layer: per channel for depthwise convolutions
    (when the config says so), observer `observer_kind` or the config's `weight_observer`."""
    depthwise = config.per_channel_depthwise and qm.is_depthwise(layer)
    axis = 0 if depthwise else None
    channels = layer.weight.shape[0] if depthwise else 1
    kind = observer_kind or config.weight_observer
    observer = make_observer(kind, axis=axis, channels=channels)
    return FakeQuantize(observer, config.weight_bits, signed=True, axis=axis)


def activation_quantizer(
    config: QuantConfig, signed: bool, bits: int | None = None
) -> FakeQuantize:
    """A fresh activation quantizer built from the config's observer choice."""
    observer = make_observer(
        config.activation_observer,
        momentum=config.moving_average_momentum,
        bins=config.histogram_bins,
        search=config.range_search,
        percentile=config.percentile,
    )
    return FakeQuantize(observer, bits or config.activation_bits, signed=signed)


def wrap_weight_layers(graph_module: fx.GraphModule, config: QuantConfig) -> int:
    """Put every conv/linear call into a `QuantLayer` with a weight quantizer; return the count."""
    count = 0
    float_params: list[str] = []
    for node in graph_module.graph.nodes:
        module = module_of(graph_module, node)
        if module is None:
            continue
        if isinstance(module, qm.WEIGHT_LAYERS) and (len(node.args) > 1 or node.kwargs):
            float_params.append(f"{node.target} ({type(module).__name__} called with "
                                "output_size)")
        elif isinstance(module, qm.WEIGHT_LAYERS):
            owner, _, name = node.target.rpartition(".")
            parent = graph_module.get_submodule(owner) if owner else graph_module
            setattr(parent, name, qm.QuantLayer(module, weight_quantizer(module, config)))
            count += 1
        elif any(True for _ in module.parameters(recurse=False)) and not isinstance(
            module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, qm.QuantLayer)
        ):
            float_params.append(f"{node.target} ({type(module).__name__})")
    if float_params:
        warnings.warn(
            "quantfx quantizes only the outputs (not the weights) of: "
            + ", ".join(float_params)
            + ". Their weights stay float; TIDL may run them in float or reject them.",
            stacklevel=3,
        )
    return count


def sixteen_bit_layers(graph_module: fx.GraphModule, config: QuantConfig) -> set[fx.Node]:
    """The layer nodes `config.sixteen_bit_layers` names ("first"/"last", paths, node names)."""
    wanted = set(config.sixteen_bit_layers)
    if not wanted:
        return set()
    layers = [
        node
        for node in graph_module.graph.nodes
        if isinstance(module_of(graph_module, node), qm.QuantLayer)
    ]
    by_name = {node.target: node for node in layers} | {node.name: node for node in layers}
    unknown = sorted(wanted - set(LAYER_ALIASES) - by_name.keys())
    if unknown:
        examples = ", ".join(repr(node.target) for node in layers[:8])
        raise ConfigError(
            f"QuantConfig.sixteen_bit_layers names {unknown}, which are not conv/linear layers "
            f"of this model. Use 'first', 'last' or layer names such as {examples}."
        )
    chosen = {by_name[name] for name in wanted & by_name.keys()}
    if "first" in wanted:
        chosen.add(layers[0])
    if "last" in wanted:
        chosen.add(layers[-1])
    return chosen


def set_bits(quantizer: FakeQuantize, bits: int) -> None:
    """Change a quantizer's width (its integer range follows)."""
    quantizer.bits = bits
    quantizer.qmin, quantizer.qmax = qrange(bits, quantizer.signed)


def _output_bits(
    graph_module: fx.GraphModule, node: fx.Node, wide: set[fx.Node], config: QuantConfig
) -> int:
    """16 for the output of a 16-bit layer (after its fused activation), else the default."""
    if node in wide:
        return 16
    if isinstance(module_of(graph_module, node), FUSABLE_ACTIVATIONS) and first_input(node) in wide:
        return 16
    return config.activation_bits


def _not(excluded: fx.Node) -> Callable[[fx.Node], bool]:
    return lambda user: user is not excluded


def place_quantizers(graph_module: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    """Insert activation quantizers per the numerics contract and weight quantizers per layer."""
    graph = graph_module.graph
    on_grid: set[fx.Node] = set()
    nonneg: set[fx.Node] = set()
    wide = sixteen_bit_layers(graph_module, config)
    for layer_node in wide:
        set_bits(module_of(graph_module, layer_node).weight_quantizer, 16)
    for node in list(graph.nodes):
        if node.op == "output":
            continue
        if _is_nonnegative(graph_module, node, nonneg, config):
            nonneg.add(node)
        source = first_input(node)
        if is_shape_only(graph_module, node) and source in on_grid:
            on_grid.add(node)
            continue
        if not is_float_tensor(node) or _fused_into_activation(graph_module, node):
            continue
        name = unique_submodule_name(graph_module, f"{QUANTIZER_PREFIX}.{node.name}")
        bits = _output_bits(graph_module, node, wide, config)
        quantizer = activation_quantizer(config, signed=node not in nonneg, bits=bits)
        graph_module.add_submodule(name, quantizer)
        with graph.inserting_after(node):
            quant_node = graph.call_module(name, args=(node,))
        quant_node.meta = dict(node.meta)
        node.replace_all_uses_with(quant_node, delete_user_cb=_not(quant_node))
        on_grid.add(quant_node)
        if node in nonneg:
            nonneg.add(quant_node)
    graph.lint()
    graph_module.recompile()
    return graph_module
