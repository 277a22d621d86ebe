"""BatchNorm folding: conv/linear followed by BatchNorm becomes one conv/linear (PTC), and the
folding formula QAT applies on the fly.

Folding before quantization is what the engine does: it never sees a BatchNorm after a conv,
only the folded weights, so the weights must be quantized after folding.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor, nn

from quantfx import modules as standins
from quantfx.layers import BatchNormLayer, batchnorm_affine
from quantfx.ops import (
    BATCHNORMS,
    FOLD_THROUGH,
    FOLD_THROUGH_IF_POSITIVE,
    FOLDABLE_LAYERS,
    TRANSPOSED_CONVS,
)
from quantfx.passes.graph_utils import module_of, recorded_shape, set_submodule


def folded_weight_bias(layer: nn.Module, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """`layer`'s weight and bias with `bn` folded in by its running statistics: torch's own
    fusion formulas (`torch.nn.utils.fusion`), but differentiable (QAT trains through them).

    A conv's output channels are weight axis 0, a transposed conv's axis 1.
    """
    weight, bias = layer.weight, layer.bias
    if bias is None:
        bias = torch.zeros_like(bn.running_mean)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    if isinstance(layer, nn.Linear):
        bn_scale = gamma * torch.rsqrt(bn.running_var + bn.eps)
        return weight * bn_scale.unsqueeze(-1), (bias - bn.running_mean) * bn_scale + beta
    var_rsqrt = torch.rsqrt(bn.running_var + bn.eps)
    shape = [1, -1] if isinstance(layer, TRANSPOSED_CONVS) else [-1, 1]
    shape += [1] * (weight.dim() - 2)
    folded_weight = (weight * (gamma * var_rsqrt).reshape(shape)).to(weight.dtype)
    folded_bias = ((bias - bn.running_mean) * var_rsqrt * gamma + beta).to(weight.dtype)
    return folded_weight, folded_bias


def foldable_pair(graph_module: fx.GraphModule, node: fx.Node, transposed: bool = True
                  ) -> fx.Node | None:
    """The conv/linear node that BatchNorm `node` can fold into, if any (an ungrouped
    transposed conv too when `transposed`: its output channels are weight axis 1)."""
    bn = module_of(graph_module, node)
    if not isinstance(bn, BATCHNORMS) or not bn.track_running_stats or bn.running_mean is None:
        return None
    producer = node.args[0] if node.args else None
    if not isinstance(producer, fx.Node) or len(producer.users) != 1:
        return None
    layer = module_of(graph_module, producer)
    is_transposed = isinstance(layer, TRANSPOSED_CONVS)
    if is_transposed and (not transposed or layer.groups != 1):
        return None
    if not isinstance(layer, FOLDABLE_LAYERS) and not is_transposed:
        return None
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != bn.num_features:
        return None
    if isinstance(layer, nn.Linear):
        shape = producer.meta.get("tensor_meta")
        if shape is None or len(shape.shape) != 2:
            return None
    return producer


def fold_batchnorm(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Fold every BatchNorm that directly follows a conv/linear (its only user) into it."""
    for node in list(graph_module.graph.nodes):
        producer = foldable_pair(graph_module, node)
        if producer is None:
            continue
        layer = module_of(graph_module, producer)
        # The layer is this call site's own copy (see unshare): replace its parameters in place
        # rather than deep-copying it, which costs as much as the rest of prepare.
        with torch.no_grad():
            weight, bias = folded_weight_bias(layer, module_of(graph_module, node))
        bias_trains = layer.bias is not None and layer.bias.requires_grad  # as torch's fusion
        layer.weight = nn.Parameter(weight, layer.weight.requires_grad)
        layer.bias = nn.Parameter(bias, bias_trains)
        producer.meta = dict(node.meta)
        node.replace_all_uses_with(producer)
        graph_module.graph.erase_node(node)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module


def _passes_affine(graph_module: fx.GraphModule, node: fx.Node, positive: bool) -> bool:
    """Whether op `node` maps a per-channel affine of its input to the same affine of its
    output (channels on axis 1; with `positive` scales where that matters)."""
    module = module_of(graph_module, node)
    if isinstance(module, FOLD_THROUGH):
        return True
    if isinstance(module, FOLD_THROUGH_IF_POSITIVE):
        return positive
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d)):  # padded zeros would average in
        return module.divisor_override is None and (
            not module.count_include_pad or not any(_pair(module.padding)))
    shape = recorded_shape(node.args[0]) if node.args else None
    if isinstance(module, standins.Mean) and shape is not None and module.dim is not None:
        dims = module.dim if isinstance(module.dim, tuple) else (module.dim,)
        return all(dim % len(shape) >= 2 for dim in dims)
    return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1


def _pair(padding: int | tuple[int, ...]) -> tuple[int, ...]:
    return padding if isinstance(padding, tuple) else (padding,)


def forward_fold_target(graph_module: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The conv/linear node a BatchNorm `node` can fold *forward* into: reached through single
    users that read the value as their only input and pass a per-channel affine (eval-mode
    no-ops, pools, spatial means, a flatten), reading it as its input, without zero padding
    (padded zeros would become the BN's shift otherwise)."""
    bn = module_of(graph_module, node)
    if (not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or not bn.track_running_stats
            or bn.running_mean is None):
        return None
    positive = bool((batchnorm_affine(bn)[0] > 0).all())
    current = node
    while len(current.users) == 1:
        user = next(iter(current.users))
        if user.op != "call_module" or user.args != (current,) or user.kwargs:
            return None
        if not _passes_affine(graph_module, user, positive):
            return user if _folds_into(module_of(graph_module, user), user, bn) else None
        current = user
    return None


def _folds_into(layer: nn.Module, node: fx.Node, bn: nn.Module) -> bool:
    """Whether an affine of `bn`'s channels folds exactly into `layer`'s input (a linear reads
    them flattened: each channel a block of features)."""
    if isinstance(layer, nn.Linear):
        shape = recorded_shape(node.args[0])
        return (shape is not None and len(shape) == 2
                and layer.in_features % bn.num_features == 0)
    if not isinstance(layer, nn.Conv2d) or isinstance(layer, BatchNormLayer):
        return False
    depthwise = layer.groups == layer.in_channels and layer.groups == layer.out_channels
    if layer.in_channels != bn.num_features or (layer.groups != 1 and not depthwise):
        return False
    return (layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
            and not any(layer.padding))


def _folded_forward(layer: nn.Module, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """`layer`'s weight and bias when its input is first scaled and shifted per channel."""
    weight = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        repeat = layer.in_features // scale.numel()  # a flattened channel is `repeat` features
        scale, shift = scale.repeat_interleave(repeat), shift.repeat_interleave(repeat)
        moved, new_weight = weight @ shift, weight * scale
    elif layer.groups == 1:
        moved = (weight.sum(dim=(2, 3)) * shift).sum(dim=1)
        new_weight = weight * scale.reshape(1, -1, 1, 1)
    else:
        moved = weight.sum(dim=(1, 2, 3)) * shift
        new_weight = weight * scale.reshape(-1, 1, 1, 1)
    bias = moved if layer.bias is None else layer.bias.detach() + moved
    return new_weight.to(weight.dtype), bias.to(weight.dtype)


def fold_batchnorm_forward(graph_module: fx.GraphModule) -> int:
    """Fold each BatchNorm that no conv/linear precedes (after a ReLU, on the input) into the
    conv/linear after it where that is exact (`forward_fold_target`): layer(a * x + b) is a
    layer with its input channels scaled by a and b moved into its bias. Returns how many were
    folded."""
    count = 0
    for node in list(graph_module.graph.nodes):
        target = forward_fold_target(graph_module, node)
        if target is None or foldable_pair(graph_module, node, transposed=False) is not None:
            continue  # (QAT folds a BN into the layer before it on the fly)
        layer = module_of(graph_module, target)
        with torch.no_grad():
            affine = batchnorm_affine(module_of(graph_module, node))
            weight, bias = _folded_forward(layer, *affine)
        trains = layer.weight.requires_grad
        layer.weight = nn.Parameter(weight, trains)
        layer.bias = nn.Parameter(bias, trains)
        node.replace_all_uses_with(node.args[0])
        graph_module.graph.erase_node(node)
        count += 1
    if count:
        graph_module.graph.lint()
        graph_module.delete_all_unused_submodules()
        graph_module.recompile()
    return count


def batchnorm_layers(graph_module: fx.GraphModule) -> int:
    """Every BatchNorm (1-D, 2-D, 3-D) left after `fold_batchnorm` and
    `fold_batchnorm_forward` (in QAT: that no conv/linear before it takes) becomes a
    `BatchNormLayer` (the same function), quantized as the engine runs it. Returns how many."""
    count = 0
    for node in graph_module.graph.nodes:
        bn = module_of(graph_module, node)
        if (isinstance(bn, BATCHNORMS) and bn.track_running_stats
                and bn.running_mean is not None
                and foldable_pair(graph_module, node, transposed=False) is None):
            set_submodule(graph_module, node.target, BatchNormLayer.from_batchnorm(bn))
            count += 1
    if count:
        graph_module.recompile()
    return count
