"""Modules called at several sites get one instance per site, parameters still tied.

A quantizer's range belongs to a call site, not to a module object: torchvision's ResNet applies
one `nn.ReLU` to tensors of very different ranges. Each extra call site gets a copy of the
module whose Parameters and buffers are the *same objects* as the original's, so training still
updates one set of weights, while fusion and quantization state are per site.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch.fx as fx
from torch import nn

from quantfx.passes.graph_utils import unique_submodule_name


def tied_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` (and its children) that shares every Parameter and buffer object."""
    memo: dict[int, object] = {id(p): p for p in module.parameters()}
    memo.update({id(b): b for b in module.buffers()})
    return copy.deepcopy(module, memo)


def unshare_modules(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Give every call site of a reused module its own (tied) module instance."""
    sites: dict[str, list[fx.Node]] = defaultdict(list)
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            sites[node.target].append(node)
    for target, nodes in sites.items():
        if len(nodes) < 2:
            continue
        original = graph_module.get_submodule(target)
        for index, node in enumerate(nodes[1:], start=1):
            name = unique_submodule_name(graph_module, f"{target}_{index}")
            graph_module.add_submodule(name, tied_copy(original))
            node.target = name
    graph_module.recompile()
    return graph_module


def untie_parameters(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Give every call site its own copy of any Parameter it shares with another (PTC: the
    engine runs each site as its own layer, and bias calibration corrects each on its own)."""
    seen: set[int] = set()
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        for module in graph_module.get_submodule(node.target).modules():
            for name, parameter in list(module.named_parameters(recurse=False)):
                if id(parameter) in seen:
                    setattr(module, name, nn.Parameter(parameter.detach().clone(),
                                                       parameter.requires_grad))
                else:
                    seen.add(id(parameter))
    return graph_module
