"""Symbolic tracing that honours `@torch.fx.wrap` and leaf modules, with readable errors.

When tracing fails, the error names the innermost module being traced and the line of the
user's source that failed, and says which of the two fixes applies.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import io
import os
import re
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from quantfx.config import QuantConfig
from quantfx.errors import ConfigError, PrepareError, TraceError
from quantfx.ops import DEFAULT_LEAF_MODULES

_TORCH_DIR = os.path.dirname(torch.__file__)
_QUANTFX_DIR = os.path.dirname(__file__)

class PieceProxy(fx.Proxy):
    """A proxy whose len() is known when it is a chunk or a listed split (`list(...)` asks for
    it before iterating); any other len() is refused as torch.fx refuses it."""

    def __len__(self) -> int:
        count = _piece_count(self.node)
        return super().__len__() if count is None else count


class QuantTracer(fx.Tracer):
    """An fx tracer that also treats the config's leaf classes and names as leaves."""

    def __init__(self, config: QuantConfig | None = None) -> None:
        # config may be None: torch.fx re-creates the tracer class with no arguments when a
        # pickled GraphModule is loaded (torch.save / torch.load of a prepared model).
        config = config if config is not None else QuantConfig()
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

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return PieceProxy(node, self)

    def iter(self, obj: fx.Proxy) -> Any:
        """Iterating over a chunk or a split into listed sizes (`list(x.chunk(2, 1))`, as
        YOLOv8's C2f does) gives one item proxy per piece; any other iteration is refused."""
        count = _piece_count(obj.node)
        if count is None:
            return super().iter(obj)
        return iter([obj[index] for index in range(count)])

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m) if m is not self.root else ""
        self.scope_stack.append((name, type(m).__name__))
        result = super().call_module(m, forward, args, kwargs)
        self.scope_stack.pop()
        return result


def _piece_count(node: fx.Node) -> int | None:
    """How many tensors `node` gives when it is a chunk into an int count (the count asked
    for: a channel count the count divides, as in C2f) or a split into listed sizes."""
    name = getattr(node.target, "__name__", node.target)
    if node.op not in ("call_method", "call_function") or name not in ("chunk", "split"):
        return None
    key = "chunks" if name == "chunk" else "split_size_or_sections"
    pieces = node.args[1] if len(node.args) > 1 else node.kwargs.get(key)
    if name == "chunk" and isinstance(pieces, int):
        return pieces
    if name == "split" and isinstance(pieces, (list, tuple)):
        return len(pieces)
    return None


def _user_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame that lies in user code (not torch, not quantfx)."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not path.startswith(_TORCH_DIR) and not path.startswith(_QUANTFX_DIR):
            return frame
    return None


def _check_leaf_names(model: nn.Module, config: QuantConfig) -> None:
    names = {name for name, _ in model.named_modules()}
    for leaf in config.leaf_modules:
        if isinstance(leaf, str) and leaf not in names:
            close = difflib.get_close_matches(leaf, sorted(names), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"QuantConfig.leaf_modules names {leaf!r}, which is not a module "
                              f"of {type(model).__name__}.{hint}")


def concrete_defaults(model: nn.Module, given: int) -> dict[str, Any]:
    """The forward parameters after the `given` example inputs that have defaults, with those
    defaults: traced as constants, so `if y is not None` and `scale=2.0` take their default
    branch and value (and need no input in the exported file)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return {}
    positional = [p for p in parameters
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword_only = [p for p in parameters if p.kind == p.KEYWORD_ONLY]
    return {p.name: p.default for p in positional[given:] + keyword_only
            if p.default is not p.empty}


def trace(model: nn.Module, config: QuantConfig,
          concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace `model` into a GraphModule, or raise `TraceError` saying where and how to fix it."""
    _check_leaf_names(model, config)
    tracer = QuantTracer(config)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args or None)
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
        leaf_advice = (
            f", or keep the whole module opaque with QuantConfig(leaf_modules=[{module_name!r}])"
            if module_name else
            " (the failing code is in the model's own forward, which cannot be a leaf module)")
        raise TraceError(
            f"torch.fx cannot trace {where}{line}\n"
            f"  {type(error).__name__}: {_first_line(error)}\n"
            "Fix: move the untraceable code (data-dependent control flow, asserts, Python "
            "calls on tensor values) into a function decorated with @torch.fx.wrap (or list it "
            f"in QuantConfig(autowrap_functions=...)){leaf_advice}."
        ) from error
    _drop_default_checks(graph)
    _readable_asserts(graph)
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _drop_default_checks(graph: fx.Graph) -> None:
    """Remove fx's checks of the arguments traced at their defaults (`_assert_is_none`,
    `_assert(x == 2.0)`): a bare AssertionError, and code that torch.load of a second model
    with them failed to re-trace (KeyError). `quantfx.inputs.TracedDefaults` checks instead."""
    for node in list(graph.nodes):
        if node.op == "call_function" and len(node.args) > 1 and isinstance(
                node.args[1], str) and "has been specialized to have value" in node.args[1]:
            condition = node.args[0]
            graph.erase_node(node)
            if isinstance(condition, fx.Node) and condition.op == "call_function" and (
                    not condition.users):
                graph.erase_node(condition)


TRACED_VALUE = re.compile(r"Proxy\(\w+\)")


def _readable_asserts(graph: fx.Graph) -> None:
    """The model's own asserts keep their check, but their messages were formatted while
    tracing: torchvision's ViT said "Expected 32 but got Proxy(getitem_2)!" to an image of
    another size. The traced value's name becomes what it stands for."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch._assert and len(
                node.args) > 1 and isinstance(node.args[1], str):
            message = TRACED_VALUE.sub("another value than at prepare", node.args[1])
            if message != node.args[1]:
                node.args = (node.args[0], message + " (a quantfx model runs at the sizes "
                             "of the example inputs it was prepared with)", *node.args[2:])


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, shortened: torch's messages can run for pages."""
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[:limit] + " ..."


class _ShapeRecorder(ShapeProp):
    """ShapeProp that remembers which node it was running (and prints nothing on failure)."""

    current: fx.Node | None = None

    def run_node(self, node: fx.Node) -> Any:
        self.current = node
        return super().run_node(node)


def _node_description(graph_module: fx.GraphModule, node: fx.Node | None) -> str:
    if node is None:
        return ""
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        return f" in module '{node.target}' ({type(module).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(
        node.target, "__name__", str(node.target))
    return f" at {node.op} '{target}' (node '{node.name}')"


def propagate_shapes(graph_module: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Run the graph on `example_inputs` once, recording each node's tensor metadata.

    The metadata (`node.meta['tensor_meta']`) tells the passes which nodes carry float
    tensors, and gives the exporter static shapes. A failure is a `PrepareError` that names
    where the model failed and the reason torch gave, in one line.
    """
    placeholders = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
    required = [node for node in placeholders if not node.args]
    if not len(required) <= len(example_inputs) <= len(placeholders):
        names = ", ".join(node.target for node in placeholders)
        raise PrepareError(
            f"example_inputs holds {len(example_inputs)} tensor(s) but the model's forward "
            f"takes {len(required)}" + (f" to {len(placeholders)}" if len(placeholders)
                                        > len(required) else "")
            + f" input(s) ({names}): give one tensor per input, in order, as a tuple."
        )
    was_training = graph_module.training
    graph_module.eval()
    recorder = _ShapeRecorder(graph_module)
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            recorder.propagate(*example_inputs)
    except Exception as error:  # noqa: BLE001 - the user's model rejected the inputs
        cause = error.__cause__ or error
        shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs)
        raise PrepareError(
            f"the model fails on example_inputs of shape(s) {shapes}"
            f"{_node_description(graph_module, recorder.current)}: "
            f"{type(cause).__name__}: {_first_line(cause)}\n"
            "Fix: pass example_inputs exactly as the model's forward takes them (a tensor or a "
            "tuple of tensors with a batch dimension, e.g. torch.randn(1, 3, 224, 224))."
        ) from error
    finally:
        graph_module.train(was_training)
