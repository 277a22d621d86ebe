"""Bounded activations stretched to the top of their power-of-2 grid, the float function unchanged.

A ReLU6 output ends at 6, and the unsigned 8-bit power-of-2 grid that holds it ends at
255/32 = 7.97: a quarter of its codes are never used, which costs the tensor 0.4 bit (2.5 dB of
its rounding noise), on every ReLU6 of a MobileNet or EfficientNet-Lite. Between two layers,
A -> ReLU6 -> [pools, reshapes, ...] -> B, the tensor can be scaled: A's weights and bias times
s = 7.97 / 6, the clip at 6 s (`nn.Hardtanh(0, 6 s)`, a Clip in the file) and B's weights
divided by s compute the same function, and the tensor now fills its grid. The same holds for
any Hardtanh(0, M). The weights of A and B land elsewhere on their own grids: on average that
costs nothing, but a per-tensor grid can be pushed past a power of two (twice as coarse), so a
pair is scaled only where the activation gains more than the two weights lose in how well they
fill their grids (`fill_db`). Measured in docs/ptc.md ("Ranges").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from quantfx.errors import LoadError
from quantfx.layers import BatchNormLayer
from quantfx.ops import SCALE_COMMUTING, WEIGHT_LAYERS
from quantfx.passes.graph_utils import is_shape_only, module_of, set_submodule
from quantfx.qmath import exponent_for_max, qrange

SMALLEST_GAIN = 1.01
"""A bound already within 1 % of its grid's top is left alone."""


class StretchedClip(nn.Hardtanh):
    """A Hardtanh(0, M) stretched by this pass: it clips at M * `stretch`. The factor is a
    buffer, so a state_dict says the weights around it were rescaled: loaded into a model
    prepared without the pass (or the reverse) it is refused (`check_loaded_alignment`)
    instead of running rescaled weights against the other bound."""

    def __init__(self, bound: float, stretch: float) -> None:
        super().__init__(0.0, bound * stretch)
        self.register_buffer("stretch", torch.tensor(float(stretch)))


def check_loaded_alignment(model: nn.Module, incompatible_keys: Any) -> None:
    """`load_state_dict` post-hook of a prepared model: a `LoadError` when the state_dict was
    saved with another `align_bounded_activations` (a `stretch` buffer missing or extra, and
    nothing else: a state_dict of another model is left to torch's list of what differs)."""
    differing = [*incompatible_keys.missing_keys, *incompatible_keys.unexpected_keys]
    keys = [key for key in differing if key.endswith(".stretch")]
    if keys and len(keys) == len(differing):
        raise LoadError(
            f"the state_dict and this model disagree on which ReLU6s were stretched to their "
            f"grid ({keys[0]}): it was saved from a model prepared with another "
            "QuantConfig.align_bounded_activations, whose weights around them are scaled for "
            "other clip bounds. Prepare with the config the state_dict was saved under.")


def grid_top(bound: float, bits: int) -> float:
    """The largest value of the unsigned `bits`-bit power-of-2 grid whose range holds `bound`."""
    return 2.0 ** math.ceil(math.log2(bound)) * (1.0 - 2.0 ** -bits)


def _layer(graph_module: fx.GraphModule, node: fx.Node | None, read: set[str]
           ) -> nn.Module | None:
    """The conv/linear `node` calls, unless the graph also reads its parameters directly
    (`read`: the get_attr targets; a tied decoder's `F.linear(x, encoder.weight.t())`):
    rescaling them would change that too."""
    module = module_of(graph_module, node) if node is not None else None
    if not isinstance(module, WEIGHT_LAYERS) or isinstance(module, BatchNormLayer):
        return None
    return None if {f"{node.target}.weight", f"{node.target}.bias"} & read else module


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].all_input_nodes == [node] else None


def _bounded_activation(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    module = module_of(graph_module, node)
    return (isinstance(module, nn.Hardtanh) and float(module.min_val) == 0.0
            and float(module.max_val) > 0.0)


def _passes_scale(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """An op that commutes with multiplying its one input by a positive number."""
    return (isinstance(module_of(graph_module, node), SCALE_COMMUTING)
            or is_shape_only(graph_module, node))


def _next_layer(graph_module: fx.GraphModule, node: fx.Node, read: set[str]
                ) -> fx.Node | None:
    """The layer that is the only reader of `node`'s output, through scale-commuting ops that
    each have one user, or None."""
    user = _only_user(node)
    while user is not None and _passes_scale(graph_module, user):
        user = _only_user(user)
    return user if user is not None and _layer(graph_module, user, read) is not None else None


def alignments(graph_module: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """(layer A, its bounded activation, layer B) for every A -> Hardtanh(0, M) -> ... -> B
    whose tensors between go nowhere else."""
    found = []
    read = {str(node.target) for node in graph_module.graph.nodes if node.op == "get_attr"}
    for node in graph_module.graph.nodes:
        if _layer(graph_module, node, read) is None:
            continue
        activation = _only_user(node)
        if activation is None or not _bounded_activation(graph_module, activation):
            continue
        consumer = _next_layer(graph_module, activation, read)
        if consumer is not None:
            found.append((node, activation, consumer))
    return found


def fill_db(weight: torch.Tensor, per_channel: bool, bits: int) -> float:
    """How much of its signed `bits`-bit power-of-2 grid(s) `weight` fills: the mean over its
    grids of 20 log10(largest magnitude / grid top), 0 dB when full, down to -6 dB."""
    qmax = qrange(bits, signed=True)[1]
    magnitude = weight.detach().abs()
    magnitude = magnitude.flatten(1).amax(1) if per_channel else magnitude.amax().reshape(1)
    magnitude = magnitude[magnitude > 0].double()
    if not len(magnitude):
        return 0.0
    top = qmax * torch.exp2(exponent_for_max(magnitude, qmax).double())
    return float((20.0 * torch.log10(magnitude / top)).mean())


def _gain_db(producer: nn.Module, consumer: nn.Module, scale: float, weight_bits: int,
             per_channel: Callable[[nn.Module], bool]) -> float:
    """What scaling by `scale` gives the activation (20 log10 scale) plus what it does to how
    well the two layers' weights fill their grids: the producer's are multiplied, the
    consumer's divided."""
    change = 20.0 * math.log10(scale)
    for layer, factor in ((producer, scale), (consumer, 1.0 / scale)):
        channels = per_channel(layer)
        change += (fill_db(layer.weight * factor, channels, weight_bits)
                   - fill_db(layer.weight, channels, weight_bits))
    return change


def align_bounded_activations(graph_module: fx.GraphModule, activation_bits: int,
                              weight_bits: int, per_channel: Callable[[nn.Module], bool]) -> int:
    """Scale every `alignments` triple whose activation gains more than its weights lose
    (`_gain_db`, weight grids per output channel where `per_channel(layer)`) so the activation's
    bound is the top of its unsigned `activation_bits`-bit grid; returns how many were scaled."""
    count = 0
    for first, activation, second in alignments(graph_module):
        bound = float(module_of(graph_module, activation).max_val)
        scale = grid_top(bound, activation_bits) / bound
        producer, consumer = module_of(graph_module, first), module_of(graph_module, second)
        if scale < SMALLEST_GAIN or _gain_db(producer, consumer, scale, weight_bits,
                                             per_channel) <= 0.0:
            continue
        with torch.no_grad():
            producer.weight.mul_(scale)
            if producer.bias is not None:
                producer.bias.mul_(scale)
            consumer.weight.div_(scale)
        set_submodule(graph_module, activation.target, StretchedClip(bound, scale))
        count += 1
    return count
