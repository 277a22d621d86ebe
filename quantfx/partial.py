"""Partial quantization: the named submodules ("parts") of a model quantized, the rest float.

Detectors and other models that do not trace whole (image lists, anchors, Python loops in
post-processing, NMS) are quantized part by part, as TI does: `QuantConfig(quantize_only=
("backbone", "head"))` names the parts, or `quantize_only="auto"` takes the largest submodules
that trace (with tensor inputs and at least one conv/linear). `prepare` / `prepare_qat` return
a copy of the whole model with each part replaced by its own prepared GraphModule; the rest
runs in float, unchanged. `calibrate` runs the *whole* model on the user's batches; `convert`
converts each part; `export_onnx(..., part=NAME)` writes one part. The state lists the parts
and, for "auto", why each module around them stays float.

This module holds what the stages share: the one question each asks (`quantized_parts`: is
this model partly quantized, and which parts), finding parts, catching their inputs, and
building the copy whose parts are prepared (`prepare_parts`) or rebuilt by a later stage
(`rebuild_parts`: convert, prepare_qat); `ptc`, `qat`, `convert`, export and distill call it,
never the other way round, and no other module reads a state's parts.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from quantfx.config import AUTO_PARTS, QuantConfig
from quantfx.errors import ConfigError, PrepareError, QuantFxError
from quantfx.frontend import build_graph, check_no_inference_mode, private_copy
from quantfx.inputs import parameter_dtype_device
from quantfx.ops import WEIGHT_LAYERS
from quantfx.passes.graph_utils import set_submodule
from quantfx.state import STATE_ATTRIBUTE, QuantState, attach_state


@dataclass
class PartCall:
    """What a submodule received the first time it ran, and how often it ran."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    calls: int = 0

    def tensor_inputs(self) -> tuple[torch.Tensor, ...] | None:
        """Its arguments when they are all tensors and there are no keywords, else None."""
        if self.kwargs or not self.args or not all(isinstance(a, torch.Tensor)
                                                   for a in self.args):
            return None
        return tuple(self.args)


def model_inputs(example_inputs: Any) -> tuple:
    """The whole model's positional arguments: a tensor, or a tuple of anything (a detector
    takes `([image, ...],)`)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, tuple) and example_inputs:
        return example_inputs
    if isinstance(example_inputs, list) and example_inputs:
        return (example_inputs,)
    raise PrepareError(f"example_inputs must be a tensor or a non-empty tuple of the model's "
                       f"arguments, got {type(example_inputs).__name__}. Example for a "
                       "detector: qf.prepare(model, ([torch.rand(3, 320, 320)],), config)")


def run_batch(model: nn.Module, batch: Any, count: int) -> Any:
    """Run the whole model on one calibration batch: a tensor, or a tuple whose first `count`
    items are its arguments (a DataLoader's (images, targets) works with count 1)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, tuple) and len(batch) >= count:
        return model(*batch[:count])
    if isinstance(batch, list) and count == 1:
        return model(batch)
    raise QuantFxError(f"a calibration batch must be a tensor, or a tuple whose first {count} "
                       f"item(s) are the model's arguments; got {type(batch).__name__}.")


@contextlib.contextmanager
def catching_calls(model: nn.Module, names: list[str]) -> Iterator[dict[str, PartCall]]:
    """While open, record each named submodule's first arguments and its number of calls."""
    calls = {name: PartCall() for name in names}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            entry = calls[name]
            if entry.calls == 0:
                entry.args, entry.kwargs = args, dict(kwargs)
            entry.calls += 1
        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name), with_kwargs=True)
               for name in names]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def part_calls(model: nn.Module, names: list[str], inputs: tuple) -> dict[str, PartCall]:
    """The first arguments of each named part in one no-grad forward of the whole model."""
    with catching_calls(model, names) as calls, torch.no_grad():
        try:
            model(*inputs)
        except QuantFxError:
            raise
        except Exception as error:  # noqa: BLE001 - the user's model rejected its inputs
            raise PrepareError(f"the model fails on its example inputs: {type(error).__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else ''}") from error
    return calls


def _has_layer(module: nn.Module) -> bool:
    return any(isinstance(child, WEIGHT_LAYERS) for child in module.modules())


def find_parts(model: nn.Module, inputs: tuple, config: QuantConfig
               ) -> tuple[list[str], dict[str, str]]:
    """The largest submodules that trace on the arguments they receive: (parts, why each
    module on the way stays float). Modules without a conv/linear are not parts."""
    names = [name for name, _ in model.named_modules() if name]
    calls = part_calls(model, names, inputs)
    plain = replace(config, quantize_only=())
    parts: list[str] = []
    floating: dict[str, str] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if not _has_layer(child):
                continue
            entry = calls[name]
            arguments = entry.tensor_inputs()
            if entry.calls == 0:  # a ModuleList never runs itself; its children may
                before = len(parts)
                visit(name, child)
                if len(parts) == before:
                    floating[name] = "never runs on the example inputs"
                continue
            if arguments is not None:
                try:
                    build_graph(child, arguments, plain, training=False)
                except QuantFxError as error:
                    floating[name] = str(error).splitlines()[0]
                else:
                    parts.append(name)
                    continue
            else:
                floating[name] = "its inputs are not tensors (a list, a dict, keywords)"
            visit(name, child)

    visit("", model)
    return parts, floating


def traces_whole(model: nn.Module, example_inputs: Any, config: QuantConfig) -> bool:
    """Whether `model` traces whole on `example_inputs` (tensors): "auto" then needs no parts."""
    inputs = model_inputs(example_inputs) if not isinstance(example_inputs, torch.Tensor) else (
        example_inputs,)
    if not all(isinstance(item, torch.Tensor) for item in inputs):
        return False
    try:
        build_graph(model, inputs, replace(config, quantize_only=()), training=False)
    except QuantFxError:
        return False
    return True


def whole_or_parts(model: nn.Module, example_inputs: Any, config: QuantConfig) -> QuantConfig:
    """`config` as given, or without "auto" when the model traces whole (one quantized model
    is better than parts of one)."""
    if config.quantize_only == AUTO_PARTS and traces_whole(model, example_inputs, config):
        return replace(config, quantize_only=())
    return config


def resolve_parts(model: nn.Module, inputs: tuple, config: QuantConfig
                  ) -> tuple[list[str], dict[str, str]]:
    """The parts `config.quantize_only` names (checked), or the ones "auto" finds."""
    if config.quantize_only == AUTO_PARTS:
        parts, floating = find_parts(model, inputs, config)
        if not parts:
            raise PrepareError("quantize_only='auto' found no submodule with a conv/linear "
                               "layer that traces: " + "; ".join(
                                   f"{name}: {why}" for name, why in list(floating.items())[:4]))
        return parts, floating
    parts = list(config.quantize_only)
    known = dict(model.named_modules())
    for name in parts:
        if name not in known or not name:
            close = [key for key in known if key and key.split(".")[-1] == name.split(".")[-1]]
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise PrepareError(f"QuantConfig.quantize_only names {name!r}, which is not a "
                               f"submodule of {type(model).__name__}.{hint}")
        for other in parts:
            if other != name and other.startswith(name + "."):
                raise PrepareError(f"QuantConfig.quantize_only names both {name!r} and "
                                   f"{other!r}, which lies inside it: name one of them.")
    return parts, {}


def prepare_parts(model: nn.Module, example_inputs: Any, config: QuantConfig,
                  prepare_part: Callable[[nn.Module, tuple, QuantConfig], nn.Module],
                  training: bool) -> tuple[nn.Module, dict[str, str], int]:
    """A copy of `model` with each part prepared by `prepare_part`; (the copy, the parts'
    descriptions and the float modules' reasons, the number of model arguments)."""
    if not isinstance(model, nn.Module):
        raise PrepareError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    check_no_inference_mode("prepare_qat" if training else "prepare")
    inputs = model_inputs(example_inputs)
    working = private_copy(model).eval()
    names, floating = resolve_parts(working, inputs, config)
    calls = part_calls(working, names, inputs)
    wide = sixteen_bit_names_by_part(config.sixteen_bit_layers, names)
    described: dict[str, str] = {}
    for name in names:
        entry = calls[name]
        arguments = entry.tensor_inputs()
        if entry.calls == 0:
            raise PrepareError(f"part {name!r} never runs when the model runs on its example "
                               "inputs: name a submodule that forward calls.")
        if arguments is None:
            raise PrepareError(f"part {name!r} is called with {_what(entry)}; quantfx quantizes "
                               "parts whose arguments are tensors: name its submodules instead "
                               "(or use quantize_only='auto').")
        try:
            part_config = replace(config, quantize_only=(), sixteen_bit_layers=wide[name])
            prepared = prepare_part(working.get_submodule(name), arguments, part_config)
        except QuantFxError as error:
            raise type(error)(f"part {name!r}: {error}") from error
        set_submodule(working, name, prepared)
        shapes = ", ".join("x".join(map(str, a.shape)) for a in arguments)
        described[name] = (f"quantized (input {shapes})" + (
            f"; runs {entry.calls} times per forward: one range for all its calls"
            if entry.calls > 1 else ""))
    for name, why in floating.items():
        if not any(name == part or name.startswith(part + ".") for part in names):
            described.setdefault(name, f"float: {why}")
    working.to(parameter_dtype_device(model)[1])
    return working, described, len(inputs)


def sixteen_bit_names_by_part(wanted: tuple[str, ...], parts: list[str]
                              ) -> dict[str, tuple[str, ...]]:
    """`QuantConfig.sixteen_bit_layers` of a partly quantized model, each part's share in its
    own names: full module paths ("backbone.0") go to their part; "first" is the first layer
    of the first part, "last" the last layer of the last part, "heads" each part's heads."""
    shares: dict[str, list[str]] = {part: [] for part in parts}
    for name in wanted:
        if name == "first" and parts:
            shares[parts[0]].append("first")
        elif name == "last" and parts:
            shares[parts[-1]].append("last")
        elif name == "heads":
            for share in shares.values():
                share.append("heads")
        else:
            owner = next((part for part in sorted(parts, key=len, reverse=True)
                          if name.startswith(part + ".")), None)
            if owner is None:
                raise ConfigError(
                    f"QuantConfig.sixteen_bit_layers names {name!r}, which is in no quantized "
                    f"part ({', '.join(parts)}): give full module paths such as "
                    f"'{parts[0]}.<layer>' (or 'first', 'last', 'heads').")
            shares[owner].append(name[len(owner) + 1:])
    return {part: tuple(share) for part, share in shares.items()}


def _what(entry: PartCall) -> str:
    kinds = [type(a).__name__ for a in entry.args] + [f"{k}=" for k in entry.kwargs]
    return ", ".join(kinds) or "no arguments"


def parts_of(model: nn.Module) -> dict[str, str]:
    """The parts of a partly quantized model (prepared, QAT or converted), each with what it is:
    "quantized (input ...)", or "float: <why>" for the modules around them ("auto")."""
    state = getattr(model, STATE_ATTRIBUTE, None) if isinstance(model, nn.Module) else None
    if state is None or not state.parts:
        raise ConfigError("parts_of needs a model prepared with QuantConfig(quantize_only=...), "
                          f"got a {type(model).__name__} quantized whole or not at all.")
    return dict(state.parts)


def quantized_parts(state: QuantState | None) -> list[str]:
    """The names of the quantized parts of a partly quantized model's state, in model order;
    [] for a model quantized whole (or not at all): the one question every stage asks."""
    if state is None or not state.parts:
        return []
    return [name for name, text in state.parts.items() if text.startswith("quantized")]


def rebuild_parts(model: nn.Module, state: QuantState,
                  build: Callable[[nn.Module, tuple | None], nn.Module], backend: str,
                  stage: str, config: QuantConfig | None = None,
                  example_inputs: Any = None) -> nn.Module:
    """A copy of partly quantized `model` with each quantized part replaced by
    `build(part, its tensor inputs)` (convert, prepare_qat; the inputs are caught on the copy
    when `example_inputs` are given, else None), the float rest as it was, under a state of
    `backend` at `stage` that keeps the parts' descriptions."""
    whole = copy.deepcopy(model)
    names = quantized_parts(state)
    calls = ({} if example_inputs is None
             else part_calls(whole, names, model_inputs(example_inputs)))
    for name in names:
        inputs = calls[name].tensor_inputs() if name in calls else None
        set_submodule(whole, name, build(whole.get_submodule(name), inputs))
    attach_state(whole, QuantState(config or state.config, backend, stage, [],
                                   parts=dict(state.parts), input_count=state.input_count))
    return whole
