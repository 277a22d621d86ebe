"""Attention masks written in user code as `scores.masked_fill(mask, float("-inf"))` with a mask
that is a constant of the model (a causal mask buffer, a fixed window pattern) become
`AdditiveMask` modules: quantized and exported as TIDL runs a mask (an Add of a constant whose
masked entries saturate the next quantizer to its lowest code), instead of a `masked_fill`
that export has no emitter for. A mask computed from the inputs stays as it is."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from quantfx.modules import AdditiveMask
from quantfx.passes.graph_utils import constant_value, set_submodule, unique_submodule_name

MASKED_FILL_CALLS = ("masked_fill", "masked_fill_", torch.masked_fill, torch.Tensor.masked_fill,
                     torch.Tensor.masked_fill_)
"""The spellings of masked_fill: the method, the function and the unbound method, in place or
not (in-place ops are values by the time this pass runs: `functionalize_in_place_ops`)."""


def _masked_fill_arguments(node: fx.Node) -> tuple[Any, Any, Any] | None:
    """(input, mask, value) of a masked_fill call, or None for any other node."""
    if node.op not in ("call_method", "call_function") or node.target not in MASKED_FILL_CALLS:
        return None
    arguments = list(node.args) + [node.kwargs.get(name) for name in ("mask", "value")
                                   if name in node.kwargs]
    return tuple(arguments[:3]) if len(arguments) >= 3 else None


def _constant_mask(graph_module: fx.GraphModule, mask: Any) -> torch.Tensor | None:
    try:
        value = constant_value(graph_module, mask)
    except LookupError:
        return None
    return value if isinstance(value, torch.Tensor) and value.dtype == torch.bool else None


def constant_masks_to_modules(graph_module: fx.GraphModule) -> int:
    """Replace each `masked_fill(constant bool mask, -inf)` by an `AdditiveMask`; returns how
    many were replaced."""
    replaced = 0
    for node in list(graph_module.graph.nodes):
        arguments = _masked_fill_arguments(node)
        if arguments is None:
            continue
        source, mask, value = arguments
        if not isinstance(value, (int, float)) or not math.isinf(value) or value > 0:
            continue
        tensor = _constant_mask(graph_module, mask)
        if tensor is None or not isinstance(source, fx.Node):
            continue
        name = unique_submodule_name(graph_module, f"{node.name}_mask")
        set_submodule(graph_module, name, AdditiveMask(tensor.detach().clone()))
        with graph_module.graph.inserting_before(node):
            module_node = graph_module.graph.call_module(name, (source,))
        module_node.meta = dict(node.meta)
        node.replace_all_uses_with(module_node)
        graph_module.graph.erase_node(node)
        replaced += 1
    if replaced:
        graph_module.graph.eliminate_dead_code()
        graph_module.graph.lint()
        graph_module.recompile()
    return replaced
