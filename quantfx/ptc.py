"""Post-training calibration: `prepare` a float model, `calibrate` its quantization ranges."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from quantfx.bias_calibration import calibrate_biases
from quantfx.checks import check_int
from quantfx.config import QuantConfig, resolve_config
from quantfx.errors import CalibrationError, QuantFxError
from quantfx.frontend import build_graph, input_shapes, require_layers, warn_unexportable
from quantfx.inputs import check_calibration_batch, describe_tensor, parameter_dtype_device
from quantfx.layers import FakeQuantLayer, with_bias
from quantfx.learned_rounding import MAX_SAMPLES as ROUNDING_SAMPLES
from quantfx.learned_rounding import learn_rounding, restore_float_weights
from quantfx.passes.equalize import equalize
from quantfx.passes.fuse import batchnorm_layers, fold_batchnorm, fold_batchnorm_forward
from quantfx.passes.place import place_quantizers
from quantfx.passes.unshare import untie_parameters
from quantfx.quantizers import QuantizerFactory, calibration_quantizers, set_quant_mode
from quantfx.state import PREPARED, PTC, QAT, QuantState, attach_state, require_state, state_of

QAT_HINT = ("A QAT model estimates its ranges while it trains; to start QAT from calibrated "
           "ranges, calibrate the prepared model and pass it to quantfx.prepare_qat.")


def prepare(
    model: nn.Module, example_inputs: Any, config: QuantConfig | None = None
) -> fx.GraphModule:
    """An eval-mode copy of `model` with observers on every tensor the engine quantizes.

    BatchNorm is folded into the preceding conv/linear. Forward passes (under `torch.no_grad()`)
    record ranges; `calibrate` is the convenience loop; `convert` freezes the result.
    """
    config = resolve_config(config)
    graph_module, inputs = build_graph(model, example_inputs, config, training=False)
    fold_batchnorm(graph_module)
    fold_batchnorm_forward(graph_module)  # a BN after a ReLU into the (unpadded) conv after it
    batchnorm_layers(graph_module)  # the BatchNorms left: per-channel affine layers
    untie_parameters(graph_module)
    if config.equalizes:
        equalize(graph_module)  # each call site is its own engine layer, with its own bias

    def weight_layer(layer: nn.Module, bn: None, quantizer: nn.Module) -> FakeQuantLayer:
        return FakeQuantLayer(with_bias(layer) if config.bias_calibration else layer, quantizer)

    count = place_quantizers(graph_module, QuantizerFactory(config), weight_layer)
    require_layers(count, model)
    warn_unexportable(graph_module)
    graph_module.to(inputs[0].device)  # the new quantizers go where the model lives
    set_quant_mode(graph_module, observe=True, quantize=False)
    attach_state(graph_module, QuantState(config, PTC, PREPARED, input_shapes(inputs)))
    return graph_module.eval()


def batch_inputs(batch: Any, count: int, index: int) -> tuple[torch.Tensor, ...]:
    """The model inputs inside one calibration batch (a tensor, or a tuple like (x, label))."""
    if isinstance(batch, torch.Tensor):
        items: tuple = (batch,)
    elif isinstance(batch, (tuple, list)):
        items = tuple(batch[:count])
    else:
        raise CalibrationError(
            f"calibration batch {index} is a {type(batch).__name__}; give tensors, or tuples "
            f"whose first {count} item(s) are the model's inputs (e.g. (images, labels))."
        )
    if len(items) != count:
        raise CalibrationError(
            f"calibration batch {index} holds {len(items)} tensor(s) but the model was prepared "
            f"with {count} input(s): give tuples whose first {count} items are its inputs.")
    return items


def iterate_batches(
    model: fx.GraphModule, data: Iterable, num_batches: int | None, description: str
) -> Iterable[tuple[torch.Tensor, ...]]:
    """Yield each batch's inputs (checked, on the model's device), with a progress bar."""
    state = state_of(model)
    shapes = state.input_shapes
    if isinstance(data, torch.Tensor):
        data = [data]
    if num_batches is not None:
        check_int(num_batches, "num_batches", 1, CalibrationError, "10, or None for all")
    try:
        total = len(data) if num_batches is None else min(num_batches, len(data))
    except TypeError:
        total = num_batches
    if isinstance(data, (str, bytes, dict)):
        raise CalibrationError(f"calibration data must be an iterable of batches (e.g. a "
                               f"DataLoader or a list of tensors), got {type(data).__name__}.")
    try:
        iterator = iter(data)
    except TypeError as error:
        raise CalibrationError(
            f"calibration data must be an iterable of batches (e.g. a DataLoader), got "
            f"{type(data).__name__}."
        ) from error
    dtype, device = parameter_dtype_device(model)
    seen = 0
    warned = False
    with tqdm(total=total, desc=description, unit="batch", leave=False,
              disable=None if state.config.progress else True) as bar:
        for index, batch in enumerate(iterator):
            if num_batches is not None and index >= num_batches:
                break
            items = batch_inputs(batch, len(shapes), index)
            check_calibration_batch(items, shapes, dtype, index)
            if state.config.nonnegative_inputs and not warned and any(
                    bool((item < 0).any()) for item in items):
                warned = True
                warnings.warn(
                    f"calibration batch {index} has negative inputs although "
                    "QuantConfig(nonnegative_inputs=True) quantizes the inputs unsigned: they "
                    "will be clipped to 0. Leave nonnegative_inputs off for normalized data.",
                    stacklevel=4)
            yield index, tuple(item.to(device) for item in items)
            seen += 1
            bar.update(1)
    if seen == 0:
        raise CalibrationError(
            "calibration data is empty: give at least one batch (a few hundred images is typical)."
        )


def _run_batch(model: fx.GraphModule, inputs: tuple[torch.Tensor, ...], index: int) -> None:
    try:
        model(*inputs)
    except QuantFxError:
        raise
    except Exception as error:  # noqa: BLE001 - the model rejected the user's batch
        shapes = ", ".join(describe_tensor(tensor) for tensor in inputs)
        expected = ", ".join(str(shape) for shape in state_of(model).input_shapes)
        message = (str(error).strip().splitlines() or [""])[0][:300]
        raise CalibrationError(
            f"the model fails on calibration batch {index} ({shapes}): "
            f"{type(error).__name__}: {message}\nFix: give batches shaped like the example "
            f"inputs ({expected}), with the same preprocessing.") from error


def calibrate(
    model: fx.GraphModule, data: Iterable, num_batches: int | None = None
) -> fx.GraphModule:
    """Run `data` through a prepared model to estimate every quantizer's range.

    `data` is an iterable of batches: tensors, or tuples whose first items are the model's
    inputs (a DataLoader of (images, labels) works as is). With `bias_calibration` on (the
    default) the first batches (`bias_calibration_samples`) are kept in memory and run again,
    once per layer depth, to correct the biases. Returns the same model.
    """
    given = state_of(model)
    hint = QAT_HINT if given is not None and given.backend == QAT else ""
    state = require_state(model, "calibrate", CalibrationError, ((PTC, PREPARED),),
                          "a model returned by quantfx.prepare", hint)
    was_training = model.training
    model.eval()
    set_quant_mode(model, observe=True, quantize=False)
    kept: list[tuple[torch.Tensor, ...]] = []
    kept_samples = 0
    learned = state.config.weight_rounding == "learned"
    budget = max(state.config.bias_calibration_samples if state.config.bias_calibration else 0,
                 ROUNDING_SAMPLES if learned else 0)
    restore_float_weights(model)  # a second calibration starts from the float weights
    state.calibration_failed = True  # until this call finishes
    try:
        with torch.no_grad():
            for index, inputs in iterate_batches(model, data, num_batches, "calibrate"):
                _run_batch(model, inputs, index)
                if kept_samples < budget:
                    kept.append(tuple(tensor[:budget - kept_samples] for tensor in inputs))
                    kept_samples += kept[-1][0].shape[0]
        for _, quantizer in calibration_quantizers(model):
            if quantizer.observed:
                quantizer.compute_exponent()
        if learned:
            learn_rounding(model, kept, state.config.progress)
        if state.config.bias_calibration:
            calibrate_biases(model, kept, state.config.progress)
        state.calibration_failed = False
    finally:
        model.train(was_training)
    return model
