"""Max pools as TIDL validates them: a k x k max pool at stride 1 with "same" padding (k odd
and above 3, as the SPPF block of YOLOv5/v8 has, 5x5) becomes (k - 1) / 2 chained 3x3 pools.

The two are equal exactly, in float and on any quantization grid (a max pool only selects
values): the max over a 3x3 window of maxima over 3x3 windows is the max over their 5x5 union,
and the padding is -inf either way. TI validates 3x3 / 2x2 / 1x1 max pools (T11.2
operators.md; `quantfx.tidl` warns on others) and its "lite" detectors make the same
replacement.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from quantfx.passes.graph_utils import module_of


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def _chained_pools(module: nn.Module | None) -> int:
    """How many 3x3 pools `module` equals (0 when it is not such a max pool)."""
    if type(module) is not nn.MaxPool2d or module.return_indices:
        return 0
    kernel = _pair(module.kernel_size)
    if (kernel[0] != kernel[1] or kernel[0] <= 3 or kernel[0] % 2 == 0
            or _pair(module.stride) != (1, 1) or _pair(module.dilation) != (1, 1)
            or _pair(module.padding) != (kernel[0] // 2, kernel[0] // 2)):
        return 0
    return (kernel[0] - 1) // 2


def split_max_pools(graph_module: fx.GraphModule) -> list[str]:
    """Replace each large stride-1 "same" max pool by chained 3x3 pools (named
    `<pool>_3x3_<i>`); returns the replaced pools' paths."""
    replaced = []
    for node in list(graph_module.graph.nodes):
        count = _chained_pools(module_of(graph_module, node))
        if not count or node.op != "call_module":
            continue
        value = node.args[0]
        with graph_module.graph.inserting_before(node):
            for index in range(count):
                name = f"{str(node.target).replace('.', '_')}_3x3_{index}"
                graph_module.add_submodule(name, nn.MaxPool2d(3, stride=1, padding=1))
                value = graph_module.graph.call_module(name, (value,))
                value.meta = dict(node.meta)  # same shape: stride 1, "same" padding
        node.replace_all_uses_with(value)
        graph_module.graph.erase_node(node)
        replaced.append(str(node.target))
    for target in replaced:
        graph_module.delete_submodule(target)
    if replaced:
        graph_module.recompile()
    return replaced
