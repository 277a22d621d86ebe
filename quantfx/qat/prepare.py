"""`prepare_qat`: a float (or calibrated) model becomes a train-mode GraphModule that the user's
own loop fine-tunes through power-of-2 fake quantizers.

What a training forward does: each conv/linear (+ its BatchNorm) is a `QATLayer` that folds BN
on the fly; activations go through `QATQuantizer`s (PACT2's running-average range, rounded up
to a power of 2, clipped STE, all-reduced across DDP ranks); a `QATController` node counts
train-mode forwards and applies the `QATSchedule`. Every piece of state lives in buffers, so
`state_dict()` round-trips QAT exactly, and `eval()` computes what `convert` will.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from quantfx.config import GRAPH_FIELDS, QuantConfig, resolve_config
from quantfx.errors import ConfigError, InternalError, PrepareError
from quantfx.frontend import (
    as_input_tuple,
    build_graph,
    check_no_inference_mode,
    input_shapes,
    require_layers,
    warn_unexportable,
)
from quantfx.inputs import check_input_tensors, parameter_dtype_device
from quantfx.layers import FakeQuantLayer, PReLULayer
from quantfx.partial import prepare_parts, quantized_parts, rebuild_parts, whole_or_parts
from quantfx.passes.fuse import batchnorm_layers, fold_batchnorm_forward
from quantfx.passes.graph_utils import (
    input_quantizer,
    module_of,
    parameter_free_nodes,
    set_submodule,
    unique_submodule_name,
)
from quantfx.passes.place import place_quantizers
from quantfx.qat.controller import CONTROLLER_NAME, QATController
from quantfx.qat.layer import QATLayer
from quantfx.quantizers import CalibrationQuantizer, QATQuantizer, QuantizerFactory
from quantfx.state import FLOAT, PREPARED, PTC, QAT, QuantState, attach_state, require_state


def prepare_qat(
    model: nn.Module, example_inputs: Any, config: QuantConfig | None = None
) -> fx.GraphModule:
    """A train-mode copy of `model` that trains through power-of-2 fake quantizers (QAT).

    `model` is a float model, or a model returned by `quantfx.prepare` (calibrated or not):
    then its BN stays folded and its calibrated ranges are the starting ranges. Train it with
    your usual loop; `eval()` and `quantfx.convert` then give identical integer-exact results.
    """
    state = require_state(model, "prepare_qat", PrepareError, (FLOAT, (PTC, PREPARED)),
                          "a float model or one returned by quantfx.prepare",
                          "Start from the float model (or the prepared one) instead.")
    if quantized_parts(state):
        return _parts_from_ptc(model, example_inputs, state,
                               _config_for_prepared(state.config, config))
    if state is not None:
        check_no_inference_mode("prepare_qat")
        dtype, _ = parameter_dtype_device(model)
        inputs = as_input_tuple(example_inputs)
        check_input_tensors(inputs, dtype, "example input", PrepareError)
        given = [tuple(tensor.shape[1:]) for tensor in inputs]
        if state.input_shapes and given != [shape[1:] for shape in state.input_shapes]:
            raise PrepareError(
                f"example_inputs of shape(s) {[tuple(t.shape) for t in inputs]} differ from "
                f"those the model was prepared with {state.input_shapes} (beyond the batch "
                "size): QAT keeps the prepared model's graph and shapes. Give inputs of that "
                "shape, or prepare the float model again at the new one.")
        return _prepare_from_ptc(model, state, _config_for_prepared(state.config, config))
    config = whole_or_parts(model, example_inputs, resolve_config(config))
    if config.quantize_only:
        working, described, count = prepare_parts(model, example_inputs, config, prepare_qat,
                                                  True)
        attach_state(working, QuantState(config, QAT, PREPARED, [], parts=described,
                                         input_count=count))
        return working.train()
    graph_module, inputs = build_graph(model, example_inputs, config, training=True)
    fold_batchnorm_forward(graph_module)  # a BN no conv/linear precedes, as PTC does: into
    batchnorm_layers(graph_module)  # the layer after it, or an affine layer TIDL runs
    def qat_layer(layer: nn.Module, bn: nn.Module | None, quantizer: nn.Module) -> QATLayer:
        return QATLayer(layer, bn, quantizer,
                        bias_bits=config.profile.bias_bits_for(quantizer.bits))

    count = place_quantizers(graph_module, QuantizerFactory(config, qat=True), qat_layer,
                             fold_bn=True)
    require_layers(count, model)
    warn_unexportable(graph_module)
    return _finish(graph_module, QuantState(config, QAT, PREPARED, input_shapes(inputs)),
                   inputs[0].device)


def _parts_from_ptc(model: nn.Module, example_inputs: Any, state: QuantState,
                    config: QuantConfig) -> nn.Module:
    """QAT from a partly quantized prepared model: each part from its calibrated PTC self."""
    check_no_inference_mode("prepare_qat")
    part_config = replace(config, quantize_only=())
    return rebuild_parts(model, state,
                         lambda part, inputs: prepare_qat(part, inputs, part_config),
                         QAT, PREPARED, config, example_inputs).train()


def _config_for_prepared(prepared: QuantConfig, given: QuantConfig | None) -> QuantConfig:
    """The config QAT from a prepared model runs with: the given one (its schedule, momentum,
    progress), which must agree with the prepared model's on everything that shaped it."""
    if given is None:
        return prepared
    given = resolve_config(given)
    differing = [name for name in GRAPH_FIELDS if getattr(given, name) != getattr(prepared, name)]
    if differing:
        raise ConfigError(
            f"prepare_qat keeps the quantizers of the prepared model it is given, but config "
            f"differs from the one it was prepared with in {', '.join(differing)}. Prepare the "
            "float model with this config (quantfx.prepare(model, inputs, config)), or pass the "
            "float model to prepare_qat.")
    return given


def _prepare_from_ptc(model: fx.GraphModule, state: QuantState,
                      config: QuantConfig) -> fx.GraphModule:
    """QAT from a `prepare`d (ideally calibrated) model: BN stays folded, ranges carry over."""
    factory = QuantizerFactory(config, qat=True)
    graph_module = copy.deepcopy(model)
    parameter_free = parameter_free_nodes(graph_module)
    for node in graph_module.graph.nodes:
        module = module_of(graph_module, node)
        if isinstance(module, FakeQuantLayer):
            set_submodule(graph_module, node.target, _qat_layer_from_ptc(module, factory, config))
        elif isinstance(module, PReLULayer):  # its slopes train: the quantizer follows them
            module.weight_quantizer = factory.slope(module.weight_quantizer.bits)
        elif isinstance(module, CalibrationQuantizer):
            learnable = node not in parameter_free
            started = factory.activation(module.bits, module.signed, learnable)
            if module.observed:
                started.start_from_exponent(float(module.observer.exponent(module.qmax)))
                ranges = config.schedule.ranges
                if ranges == "calibrated" or (ranges == "learned" and not learnable):
                    # kept, as calibrated weights are; or a range nothing could learn
                    started.observer_enabled.fill_(False)
            set_submodule(graph_module, node.target, started)
    return _finish(graph_module, QuantState(config, QAT, PREPARED, list(state.input_shapes)),
                   parameter_dtype_device(model)[1])


def _qat_layer_from_ptc(module: FakeQuantLayer, factory: QuantizerFactory,
                        config: QuantConfig) -> QATLayer:
    """The QAT layer of a calibrated layer: with rule "calibrated", its weight keeps the
    exponent calibration chose (an uncalibrated one follows "minmax")."""
    calibrated = module.weight_quantizer
    rule = config.schedule.weight_exponent
    if rule == "calibrated" and not calibrated.observed:
        rule = "minmax"
    quantizer = factory.weight(module.layer, calibrated.bits, rule)
    if rule == "calibrated":
        quantizer.exponent.copy_(calibrated.current_exponent())
    elif rule == "learned" and calibrated.observed:
        quantizer.start_from_exponent(calibrated.current_exponent())
    return QATLayer(module.layer, None, quantizer,
                    bias_bits=config.profile.bias_bits_for(quantizer.bits))


def _finish(graph_module: fx.GraphModule, state: QuantState,
            device: torch.device) -> fx.GraphModule:
    """Link layers to their input quantizers, clip weight outliers, add the schedule
    controller, move what was added to the model's device, go to train mode."""
    schedule = state.config.schedule
    controller = QATController(schedule)
    name = unique_submodule_name(graph_module, CONTROLLER_NAME)  # the model may have one
    graph_module.add_submodule(name, controller)
    graph = graph_module.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before():
        graph.call_module(name, args=())
    for node in graph.nodes:
        module = module_of(graph_module, node)
        if isinstance(module, QATLayer):
            quantizer = input_quantizer(graph_module, node)
            if quantizer is None:
                raise InternalError(f"the input of layer '{node.target}' has no quantizer.")
            module.__dict__["input_quantizer"] = quantizer
            controller.layers.append(module)
            if schedule.weight_clip_std is not None:
                module.clip_weight_outliers(schedule.weight_clip_std)
        elif isinstance(module, QATQuantizer):
            controller.activation_quantizers.append(module)
    graph.lint()
    graph_module.recompile()
    graph_module.to(device)
    attach_state(graph_module, state)  # survives deepcopy (an EMA copy is still a QAT model)
    if 0 in (schedule.freeze_ranges_step, schedule.freeze_ranges_epoch) and any(
            not quantizer.observed for quantizer in controller.activation_quantizers):
        raise ConfigError(
            "QATSchedule freezes the ranges at step/epoch 0, before they saw any data, so they "
            "would never quantize: freeze later, or pass a calibrated quantfx.prepare model.")
    controller.apply_schedule()  # a schedule with 0 freezes at once
    return graph_module.train()


def lower_qat_layers(graph_module: fx.GraphModule) -> None:
    """For `convert`: drop the controller, fold each `QATLayer` into a plain `FakeQuantLayer`."""
    for node in list(graph_module.graph.nodes):
        module = module_of(graph_module, node)
        if isinstance(module, QATController):
            graph_module.graph.erase_node(node)
        elif isinstance(module, QATLayer):
            set_submodule(graph_module, node.target, module.to_fake_quant_layer())
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
