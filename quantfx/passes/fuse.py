"""BatchNorm folding: conv/linear followed by BatchNorm becomes one conv/linear (PTC).

Folding before quantization is what the engine does: it never sees a BatchNorm after a conv,
only the folded weights, so the weights must be quantized after folding.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from quantfx.passes.graph_utils import module_of

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def set_submodule(graph_module: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `target`."""
    owner, _, name = target.rpartition(".")
    parent = graph_module.get_submodule(owner) if owner else graph_module
    setattr(parent, name, module)


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
        bn = module_of(graph_module, node)
        # The layer is this call site's own copy (see unshare): replace its parameters in place
        # rather than deep-copying it, which costs as much as the rest of prepare.
        statistics = (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        if isinstance(layer, nn.Linear):
            weight, bias = fuse_linear_bn_weights(layer.weight, layer.bias, *statistics)
        else:
            weight, bias = fuse_conv_bn_weights(layer.weight, layer.bias, *statistics,
                                                transpose=isinstance(layer, TRANSPOSED_CONVS))
        layer.weight, layer.bias = weight, bias
        producer.meta = dict(node.meta)
        node.replace_all_uses_with(producer)
        graph_module.graph.erase_node(node)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module
