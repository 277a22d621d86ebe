"""Symbolic tracing that honours `@torch.fx.wrap` and leaf modules, with readable errors.

When tracing fails, the error names the innermost module being traced and the line of the
user's source that failed, and says which of the two fixes applies.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from quantfx.config import QuantConfig
from quantfx.errors import PrepareError, TraceError
from quantfx.ops import DEFAULT_LEAF_MODULES

_TORCH_DIR = os.path.dirname(torch.__file__)
_QUANTFX_DIR = os.path.dirname(__file__)

class QuantTracer(fx.Tracer):
    """An fx tracer that also treats the config's leaf classes and names as leaves."""

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(autowrap_functions=tuple(config.autowrap_functions))
        self.leaf_types = DEFAULT_LEAF_MODULES + tuple(
            leaf for leaf in config.leaf_modules if isinstance(leaf, type)
        )
        self.leaf_names = {leaf for leaf in config.leaf_modules if isinstance(leaf, str)}
        self.scope_stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m) if m is not self.root else ""
        self.scope_stack.append((name, type(m).__name__))
        result = super().call_module(m, forward, args, kwargs)
        self.scope_stack.pop()
        return result


def _user_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame that lies in user code (not torch, not quantfx)."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not path.startswith(_TORCH_DIR) and not path.startswith(_QUANTFX_DIR):
            return frame
    return None


def trace(model: nn.Module, config: QuantConfig) -> fx.GraphModule:
    """Trace `model` into a GraphModule, or raise `TraceError` saying where and how to fix it."""
    tracer = QuantTracer(config)
    try:
        graph = tracer.trace(model)
    except Exception as error:  # noqa: BLE001 - any failure inside user code is re-raised
        module_name, module_type = (
            tracer.scope_stack[-1] if tracer.scope_stack else ("", type(model).__name__)
        )
        where = (
            f"module '{module_name}' ({module_type})"
            if module_name
            else f"the model ({module_type})"
        )
        frame = _user_frame(error)
        line = (
            f" at {frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`" if frame else ""
        )
        raise TraceError(
            f"torch.fx cannot trace {where}{line}\n"
            f"  {type(error).__name__}: {error}\n"
            "Fix: move the untraceable code (data-dependent control flow, asserts, Python "
            "calls on tensor values) into a function decorated with @torch.fx.wrap (or list it "
            "in QuantConfig(autowrap_functions=...)), or keep the whole module opaque with "
            f"QuantConfig(leaf_modules=[{module_type if not module_name else repr(module_name)}])."
        ) from error
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def propagate_shapes(graph_module: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Run the graph on `example_inputs` once, recording each node's tensor metadata.

    The metadata (`node.meta['tensor_meta']`) tells the passes which nodes carry float
    tensors, and gives the exporter static shapes.
    """
    placeholders = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
    if len(example_inputs) > len(placeholders):
        raise PrepareError(
            f"example_inputs has {len(example_inputs)} tensors but the model's forward takes "
            f"{len(placeholders)} input(s) ({', '.join(node.target for node in placeholders)})."
        )
    was_training = graph_module.training
    graph_module.eval()
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(*example_inputs)
    except Exception as error:  # noqa: BLE001 - the user's model rejected the inputs
        shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs)
        raise PrepareError(
            f"the model fails on example_inputs of shape(s) {shapes}: "
            f"{type(error).__name__}: {error}\n"
            "Fix: pass example_inputs exactly as the model's forward takes them (a tensor or a "
            "tuple of tensors with a batch dimension, e.g. torch.randn(1, 3, 224, 224))."
        ) from error
    finally:
        graph_module.train(was_training)
