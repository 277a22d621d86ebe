"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"), with the absorption
of biases that equalization makes large, on the BN-folded float graph.

Two consecutive layers A -> B (conv/linear -> conv/linear, through a ReLU / PReLU / LeakyReLU,
max or average pooling, or nothing) compute the same function when output channel i of A is
divided by s_i > 0 and B's weights that read channel i are multiplied by s_i: those ops commute
with positive per-channel scaling. With
s_i = sqrt(r_A,i / r_B,i) (r: the channel's weight range) both layers' channel i end with the
range sqrt(r_A,i * r_B,i), so one power-of-2 scale per tensor fits every channel far better:
what per-tensor depthwise convolutions (TDA4VM) need. Chains conv -> depthwise -> conv are
equalized pair by pair, a few rounds. ReLU6 does not commute with scaling (it clips at 6):
such pairs are left alone unless `relu6_as_relu` (which changes the float function).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from quantfx.layers import BatchNormLayer, is_depthwise
from quantfx.ops import POSITIVE_HOMOGENEOUS, SCALE_COMMUTING
from quantfx.passes.graph_utils import module_of

ROUNDS = 4
"""Passes over all pairs: a depthwise layer between two convs settles in a few."""


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _equalizable(module: nn.Module | None) -> bool:
    """A conv (ungrouped or depthwise, not transposed; not a BatchNorm layer) or a linear."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
            and not isinstance(module, BatchNormLayer)
            and (module.groups == 1 or is_depthwise(module)))


def _walk_between(graph_module: fx.GraphModule, node: fx.Node, relu6_as_relu: bool
                  ) -> tuple[fx.Node | None, nn.Module | None, bool]:
    """From layer `node` through single-user scale-commuting ops and at most one activation:
    (the next node, the activation or None, whether anything lay between)."""
    activation, between = None, False
    user = _single_user(node)
    while user is not None and user.op == "call_module":
        module = module_of(graph_module, user)
        if isinstance(module, POSITIVE_HOMOGENEOUS + (nn.ReLU6,)) and activation is None:
            if isinstance(module, nn.ReLU6) and not relu6_as_relu:
                return None, None, True
            activation = module
        elif not isinstance(module, SCALE_COMMUTING):
            break
        between = True
        node, user = user, _single_user(user)
    if user is None or not user.args or user.args[0] is not node:
        return None, activation, between
    return user, activation, between


def equalization_pairs(graph_module: fx.GraphModule, relu6_as_relu: bool = False
                       ) -> list[tuple[nn.Module, nn.Module, nn.Module | None, bool]]:
    """(A, B, the activation between or None, whether any op lies between) for every
    A -> [activation, pooling, ...] -> B whose intermediate tensors go nowhere else, and whose
    channels line up (A's outputs are B's inputs)."""
    pairs = []
    for node in graph_module.graph.nodes:
        first = module_of(graph_module, node)
        if not _equalizable(first):
            continue
        user, activation, between = _walk_between(graph_module, node, relu6_as_relu)
        second = module_of(graph_module, user) if user is not None else None
        if not _equalizable(second):
            continue
        channels = first.out_features if isinstance(first, nn.Linear) else first.out_channels
        inputs = second.in_features if isinstance(second, nn.Linear) else second.in_channels
        if channels == inputs and isinstance(first, nn.Linear) == isinstance(second, nn.Linear):
            pairs.append((first, second, activation, between))
    return pairs


def _output_ranges(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().abs().flatten(1).amax(dim=1)


def _per_input(layer: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """A depthwise conv's per-input-channel values spread over its filters: with a channel
    multiplier k, filters k*i .. k*i+k-1 read input channel i."""
    return values.repeat_interleave(layer.out_channels // layer.in_channels)


def _input_ranges(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight.detach().abs()
    if is_depthwise(layer):  # filter j reads input channel j // multiplier only
        return weight.flatten(1).amax(dim=1).reshape(layer.in_channels, -1).amax(dim=1)
    return weight.transpose(0, 1).flatten(1).amax(dim=1)


def _scale_pair(first: nn.Module, second: nn.Module) -> None:
    """Equalize the ranges of first's output channels and second's input channels."""
    first_ranges, second_ranges = _output_ranges(first), _input_ranges(second)
    usable = (first_ranges > 0) & (second_ranges > 0)
    scales = torch.where(usable, torch.sqrt(first_ranges / second_ranges.clamp_min(1e-30)),
                         torch.ones_like(first_ranges))
    with torch.no_grad():
        shape = [-1] + [1] * (first.weight.dim() - 1)
        first.weight.div_(scales.reshape(shape))
        if first.bias is not None:
            first.bias.div_(scales)
        if is_depthwise(second):
            second.weight.mul_(_per_input(second, scales).reshape(
                [-1] + [1] * (second.weight.dim() - 1)))
        else:
            second.weight.mul_(scales.reshape([1, -1] + [1] * (second.weight.dim() - 2)))


def _absorb_bias(first: nn.Module, second: nn.Module) -> None:
    """With no activation between, first's bias moves into second's (exact): B(Ax + b) =
    BAx + Bb, so first's output range no longer carries the (often large) shift."""
    if first.bias is None:
        return
    with torch.no_grad():
        weight = second.weight
        if is_depthwise(second):
            moved = weight.flatten(1).sum(dim=1) * _per_input(second, first.bias)
        else:
            moved = weight.flatten(2).sum(dim=2) @ first.bias if weight.dim() > 2 else (
                weight @ first.bias)
        if second.bias is None:
            second.bias = nn.Parameter(torch.zeros_like(moved))
        second.bias.add_(moved)
        first.bias.zero_()


def equalize(graph_module: fx.GraphModule, relu6_as_relu: bool = False) -> int:
    """Equalize every pair of `equalization_pairs` (ReLU6 between them replaced by ReLU when
    `relu6_as_relu`); returns the number of pairs."""
    pairs = equalization_pairs(graph_module, relu6_as_relu)
    if relu6_as_relu:
        for node in graph_module.graph.nodes:
            if any(activation is module_of(graph_module, node) for _, _, activation, _ in pairs
                   if isinstance(activation, nn.ReLU6)):
                owner, _, name = node.target.rpartition(".")
                setattr(graph_module.get_submodule(owner) if owner else graph_module, name,
                        nn.ReLU())
    for _ in range(ROUNDS):
        for first, second, _activation, _between in pairs:
            _scale_pair(first, second)
    for first, second, _activation, between in pairs:
        if not between and not _has_padding(second):
            _absorb_bias(first, second)
    return len(pairs)


def _has_padding(layer: nn.Module) -> bool:
    """A zero-padded conv sees zeros, not the moved bias, at its borders: absorbing would not
    be exact there."""
    padding = getattr(layer, "padding", 0)
    return padding != "valid" and (isinstance(padding, str) or any(p > 0 for p in padding))
