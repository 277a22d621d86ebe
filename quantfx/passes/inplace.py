"""In-place ops become plain data flow: later uses of a tensor an op mutated read the op's result.

torch.fx records `y.relu_()` as a call whose result may go unused, while later code keeps
reading `y`, which the call changed. quantfx turns in-place ops into out-of-place modules (each
call site gets its own quantizer), so without this pass those later reads would see the value
from before the op. Run before any rewrite; straight-line code only (a mutation through a view
of another tensor is not followed).
"""

from __future__ import annotations

import inspect
import operator

import torch.fx as fx

from quantfx.passes.graph_utils import module_of

IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.ipow, operator.iand, operator.ior}
"""Augmented assignments, which mutate a tensor in place (and every alias of it)."""


def _is_in_place(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` overwrites its first argument and returns it."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_module":
        return getattr(module_of(graph_module, node), "inplace", False) is True
    if node.op != "call_function":
        return False
    if node.target in IN_PLACE_OPERATORS:
        return True
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        return True
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def functionalize_in_place_ops(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Redirect the uses of each mutated tensor that come after the mutation to its result."""
    order = {node: index for index, node in enumerate(graph_module.graph.nodes)}
    for node in list(graph_module.graph.nodes):
        mutated = node.args[0] if node.args else None
        if not isinstance(mutated, fx.Node) or not _is_in_place(graph_module, node):
            continue
        for user in list(mutated.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(mutated, node)
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module
