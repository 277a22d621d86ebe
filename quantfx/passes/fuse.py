"""BatchNorm folding: conv/linear followed by BatchNorm becomes one conv/linear (PTC), and the
folding formula QAT applies on the fly.

Folding before quantization is what the engine does: it never sees a BatchNorm after a conv,
only the folded weights, so the weights must be quantized after folding.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor, nn

from quantfx.ops import BATCHNORMS, FOLDABLE_LAYERS, TRANSPOSED_CONVS
from quantfx.passes.graph_utils import module_of


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
