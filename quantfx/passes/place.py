"""Quantizer placement per the numerics contract (DESIGN.md), for both back ends.

Every float tensor the engine holds gets a quantizer: network inputs, each layer's output after
its fused activation, elementwise ops, concat, pooling, resize, activation functions and any op
quantfx does not know. Shape-only ops (flatten, reshape, max-pool, dropout, ...) keep the
quantization of their input. A quantizer is unsigned when its tensor is provably non-negative.
Each conv/linear becomes a weight layer (a `FakeQuantLayer`, or a `QATLayer` that also takes its
BatchNorm) with its own weight quantizer. What kind of quantizer is built is the factory's
choice; where quantizers go and how wide they are is decided here, once, before any is built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx
from torch import nn

from quantfx import modules as standins
from quantfx.config import LAYER_ALIASES, QuantConfig
from quantfx.errors import ConfigError, warn
from quantfx.layers import FakeQuantLayer, PReLULayer
from quantfx.ops import (
    FUSABLE_ACTIVATIONS,
    FUSE_PRODUCERS,
    MATMULS,
    MONOTONE_RESIZE_MODES,
    NONNEGATIVE_OUTPUT_MODULES,
    ORDER_PRESERVING_MODULES,
    UNQUANTIZED_PARAMETER_MODULES,
    WEIGHT_LAYERS,
)
from quantfx.passes.fuse import foldable_pair
from quantfx.passes.graph_utils import (
    first_input,
    is_float_tensor,
    is_shape_only,
    module_of,
    output_values,
    parameter_free_nodes,
    set_submodule,
    unique_submodule_name,
)
from quantfx.qmath import per_tensor_cost
from quantfx.quantizers import Quantizer, QuantizerFactory
from quantfx.tidl.profiles import COARSE_CODES

QUANTIZER_PREFIX = "quantizers"

WeightLayerBuilder = Callable[[nn.Module, nn.Module | None, nn.Module], nn.Module]
"""(layer, its foldable BatchNorm or None, weight quantizer) -> the prepared weight layer."""


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
    if isinstance(module, standins.Interpolate) and module.mode not in MONOTONE_RESIZE_MODES:
        return False
    if isinstance(module, (standins.Add, standins.Mul)):
        numbers = [arg for arg in node.args if isinstance(arg, (int, float))]
        if any(number < 0 for number in numbers):
            return False
    elif not (
        isinstance(module, ORDER_PRESERVING_MODULES + (standins.Interpolate, Quantizer))
        or is_shape_only(graph_module, node)
    ):
        return False
    inputs: list[fx.Node] = []
    fx.node.map_arg(node.args, inputs.append)
    data = [arg for arg in inputs if _carries_tensors(arg)]
    return bool(data) and all(arg in nonneg for arg in data)


def _fused_into_activation(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """True when `node` is a layer whose only user is a clipping activation fused into it."""
    module = module_of(graph_module, node)
    if isinstance(module, FakeQuantLayer):
        module = module.layer
    if not isinstance(module, FUSE_PRODUCERS) or len(node.users) != 1:
        return False
    user = next(iter(node.users))
    return isinstance(module_of(graph_module, user), FUSABLE_ACTIVATIONS)


def weight_layer_nodes(graph_module: fx.GraphModule) -> list[fx.Node]:
    """The conv/linear calls that get quantized weights (a transposed conv called with an
    `output_size` keeps float weights), in graph order."""
    return [node for node in graph_module.graph.nodes
            if isinstance(module_of(graph_module, node), WEIGHT_LAYERS)
            and len(node.args) == 1 and not node.kwargs]


def sixteen_bit_layers(graph_module: fx.GraphModule, layers: list[fx.Node],
                       config: QuantConfig) -> set[fx.Node]:
    """The nodes `config.sixteen_bit_layers` names: conv/linear layers ("first"/"last", module
    paths, node names; 16-bit weights and output) or any other node by its graph name (e.g.
    "add_3", as `analyze` reports it; a 16-bit output)."""
    wanted = set(config.sixteen_bit_layers)
    if not wanted:
        return set()
    nodes = [node for node in graph_module.graph.nodes if node.op != "output"]
    by_name = {node.name: node for node in nodes} | {node.target: node for node in layers}
    unknown = sorted(wanted - set(LAYER_ALIASES) - by_name.keys())
    if unknown:
        examples = ", ".join(repr(node.target) for node in layers[:8])
        raise ConfigError(
            f"QuantConfig.sixteen_bit_layers names {unknown}, which are not layers or tensors "
            f"of this model. Use 'first', 'last', 'heads', layer names such as {examples}, or the "
            "tensor names `quantfx.analyze` reports."
        )
    chosen = {by_name[name] for name in wanted & by_name.keys()}
    if layers and "first" in wanted:
        chosen.add(layers[0])
    if layers and "last" in wanted:
        chosen.add(layers[-1])
    if "heads" in wanted:
        chosen |= head_layers(graph_module, layers)
    return chosen


def head_layers(graph_module: fx.GraphModule, layers: list[fx.Node]) -> set[fx.Node]:
    """The conv/linear layers whose outputs reach a model output through no other conv/linear
    layer (walking back from the outputs through reshapes, concats, activations, ...)."""
    weight_layers = set(layers)
    found: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    pending = [value for value in output_values(graph_module) if isinstance(value, fx.Node)]
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in weight_layers:
            found.add(node)
        else:
            pending.extend(node.all_input_nodes)
    return found


def _warn_float_parameters(graph_module: fx.GraphModule, wrapped: set[fx.Node]) -> None:
    """Say which modules keep float parameters (TIDL may run them in float or reject them)."""
    float_params: list[str] = []
    for node in graph_module.graph.nodes:
        module = module_of(graph_module, node)
        if module is None or node in wrapped:
            continue
        if isinstance(module, WEIGHT_LAYERS):
            float_params.append(f"{node.target} ({type(module).__name__} called with "
                                "output_size)")
        elif any(True for _ in module.parameters(recurse=False)) and not isinstance(
                module, UNQUANTIZED_PARAMETER_MODULES):
            float_params.append(f"{node.target} ({type(module).__name__})")
    if float_params:
        warn(
            "quantfx quantizes only the outputs (not the weights) of: "
            + ", ".join(float_params)
            + ". Their weights stay float; TIDL may run them in float or reject them.")


def wrap_weight_layers(graph_module: fx.GraphModule, layers: list[fx.Node], wide: set[fx.Node],
                       factory: QuantizerFactory, build: WeightLayerBuilder,
                       fold_bn: bool) -> None:
    """Replace each layer node's module by `build(layer, bn, weight quantizer)`; with `fold_bn`
    a BatchNorm that folds into the layer (not a transposed conv's) moves into it."""
    for node in layers:
        layer = module_of(graph_module, node)
        bn = None
        users = list(node.users)
        if fold_bn and len(users) == 1 and foldable_pair(graph_module, users[0],
                                                         transposed=False) is node:
            bn_node = users[0]
            bn = module_of(graph_module, bn_node)
            node.meta = dict(bn_node.meta)
            bn_node.replace_all_uses_with(node)
            graph_module.graph.erase_node(bn_node)
        quantizer = factory.weight(layer, 16 if node in wide else factory.config.weight_bits)
        set_submodule(graph_module, node.target, build(layer, bn, quantizer))
        read_parameters_through_wrapper(graph_module, str(node.target))
    _warn_float_parameters(graph_module, set(layers) | wrap_prelu_slopes(graph_module, factory))
    graph_module.delete_all_unused_submodules()


def read_parameters_through_wrapper(graph_module: fx.GraphModule, target: str) -> None:
    """Code that reads a wrapped layer's parameters itself (tied weights, `conv.weight.shape`)
    reads them at `<layer>.layer.<name>` now: the wrapper keeps the layer as `.layer`."""
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith(target + "."):
            node.target = f"{target}.layer.{str(node.target)[len(target) + 1:]}"


def wrap_prelu_slopes(graph_module: fx.GraphModule, factory: QuantizerFactory) -> set[fx.Node]:
    """Give each PReLU a slope quantizer (`PReLULayer`, `weight_bits` wide); returns their
    nodes."""
    wrapped = set()
    for node in graph_module.graph.nodes:
        module = module_of(graph_module, node)
        if isinstance(module, nn.PReLU):
            quantizer = factory.slope(factory.config.weight_bits)
            set_submodule(graph_module, node.target, PReLULayer(module, quantizer))
            wrapped.add(node)
    return wrapped


def _output_bits(
    graph_module: fx.GraphModule, node: fx.Node, wide: set[fx.Node], config: QuantConfig
) -> int:
    """16 for the output of a 16-bit layer (after its fused activation), else the default."""
    if node in wide:
        return 16
    if isinstance(module_of(graph_module, node), FUSABLE_ACTIVATIONS) and first_input(node) in wide:
        return 16
    return config.activation_bits


def _feeds_matmul(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node`'s value reaches a MatMul, directly or through shape-only ops."""
    for user in node.users:
        if user.target in MATMULS and user.op in ("call_function", "call_method"):
            return True
        if is_shape_only(graph_module, user) and _feeds_matmul(graph_module, user):
            return True
    return False


def _signed(graph_module: fx.GraphModule, node: fx.Node, nonneg: set[fx.Node],
            config: QuantConfig) -> bool:
    """Signed unless provably non-negative; always signed into a MatMul on a device that has
    no signed x unsigned MatMul (TDA4VM [T11.2]): softmax probabilities times values."""
    if node not in nonneg:
        return True
    return not config.profile.signed_unsigned_matmul and _feeds_matmul(graph_module, node)


def _not(excluded: fx.Node) -> Callable[[fx.Node], bool]:
    return lambda user: user is not excluded


def place_activation_quantizers(graph_module: fx.GraphModule, wide: set[fx.Node],
                                factory: QuantizerFactory) -> None:
    """Insert a quantizer after every float tensor the engine holds (see the module text)."""
    config = factory.config
    graph = graph_module.graph
    on_grid: set[fx.Node] = set()
    nonneg: set[fx.Node] = set()
    parameter_free = parameter_free_nodes(graph_module)
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
        graph_module.add_submodule(name, factory.activation(
            bits, signed=_signed(graph_module, node, nonneg, config),
            learnable=node not in parameter_free))
        with graph.inserting_after(node):
            quant_node = graph.call_module(name, args=(node,))
        quant_node.meta = dict(node.meta)
        node.replace_all_uses_with(quant_node, delete_user_cb=_not(quant_node))
        on_grid.add(quant_node)
        if node in nonneg:
            nonneg.add(quant_node)


COARSE_SHARE = 0.25
"""`QuantConfig.widen_coarse_weights`: a layer is coarse when at least this share of its output
channels keeps fewer than `COARSE_CODES` codes on its one 8-bit weight grid."""
MAX_WIDENED_SHARE = 0.1
"""At most this share of the layers (at least one) get 16-bit weights that way."""


def coarse_weight_layers(graph_module: fx.GraphModule, layers: list[fx.Node],
                         factory: QuantizerFactory) -> set[fx.Node]:
    """The layers `QuantConfig.widen_coarse_weights` gives 16-bit weights: per-tensor 8-bit
    weights (PTC, BN folded) under which a quarter of the output channels keep fewer than 8
    codes -- a BN-folded stem whose channel ranges span 20x -- the coarsest first. Decided
    from the weights alone, so a model prepared again decides the same."""
    config = factory.config
    if not config.widen_coarse_weights or factory.qat or config.weight_bits != 8:
        return set()
    shares = []
    for node in layers:
        layer = module_of(graph_module, node)
        if factory.per_channel(layer) or layer.weight.shape[0] < 2:
            continue
        channel_peaks = layer.weight.detach().abs().flatten(1).amax(dim=1)
        _, peak_codes = per_tensor_cost(channel_peaks)  # their codes on the layer's one grid
        share = float((peak_codes < COARSE_CODES).float().mean())
        if share >= COARSE_SHARE:
            shares.append((-share, len(shares), node))
    shares.sort()
    return {node for _, _, node in shares[:max(1, int(MAX_WIDENED_SHARE * len(layers)))]}


def place_quantizers(graph_module: fx.GraphModule, factory: QuantizerFactory,
                     build: WeightLayerBuilder, fold_bn: bool = False) -> int:
    """Wrap every conv/linear as a weight layer and quantize every activation the engine holds;
    returns the number of weight layers. Widths (8/16) are decided first, from the config."""
    layers = weight_layer_nodes(graph_module)
    wide = sixteen_bit_layers(graph_module, layers, factory.config)
    coarse = coarse_weight_layers(graph_module, layers, factory) - wide
    wrap_weight_layers(graph_module, layers, wide | coarse, factory, build, fold_bn)
    place_activation_quantizers(graph_module, wide, factory)
    graph_module.graph.lint()
    graph_module.recompile()
    return len(layers)
