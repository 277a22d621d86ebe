"""Post-training calibration: `prepare` a float model, `calibrate` its quantization ranges."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from quantfx.bias_calibration import calibrate_biases
from quantfx.config import QuantConfig, resolve_config
from quantfx.errors import CalibrationError
from quantfx.frontend import build_graph, input_shapes, require_layers
from quantfx.layers import FakeQuantLayer
from quantfx.passes.fuse import fold_batchnorm
from quantfx.passes.place import place_quantizers
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
    count = place_quantizers(graph_module, QuantizerFactory(config),
                             lambda layer, bn, quantizer: FakeQuantLayer(layer, quantizer))
    require_layers(count, model)
    set_quant_mode(graph_module, observe=True, quantize=False)
    attach_state(graph_module, QuantState(config, PTC, PREPARED, input_shapes(inputs)))
    return graph_module.eval()


def batch_inputs(batch: Any, count: int, index: int) -> tuple[torch.Tensor, ...]:
    """The model inputs inside one calibration batch (a tensor, or a tuple like (x, label))."""
    if isinstance(batch, torch.Tensor):
        items: tuple = (batch,)
    elif isinstance(batch, (tuple, list)) and len(batch) >= count:
        items = tuple(batch[:count])
    else:
        raise CalibrationError(
            f"calibration batch {index} is a {type(batch).__name__}; give tensors, or tuples "
            f"whose first {count} item(s) are the model's inputs (e.g. (images, labels))."
        )
    for position, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise CalibrationError(
                f"calibration batch {index}, item {position} is a {type(item).__name__}, "
                "not a tensor."
            )
        if item.is_floating_point() and not torch.isfinite(item).all():
            raise CalibrationError(
                f"calibration batch {index} holds NaN or Inf values: ranges estimated from it "
                "would be meaningless. Clean the data (or drop the batch) and calibrate again."
            )
    return items


def iterate_batches(
    model: fx.GraphModule, data: Iterable, num_batches: int | None, description: str
) -> Iterable[tuple[torch.Tensor, ...]]:
    """Yield each batch's inputs (on the model's device), with a progress bar."""
    state = state_of(model)
    count = len(state.input_shapes) if state else 1
    if isinstance(data, torch.Tensor):
        data = [data]
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise CalibrationError(
            f"num_batches must be a positive integer or None, got {num_batches!r}."
        )
    try:
        total = len(data) if num_batches is None else min(num_batches, len(data))
    except TypeError:
        total = num_batches
    try:
        iterator = iter(data)
    except TypeError as error:
        raise CalibrationError(
            f"calibration data must be an iterable of batches (e.g. a DataLoader), got "
            f"{type(data).__name__}."
        ) from error
    device = next(iter(model.parameters()), torch.empty(0)).device
    progress = state.config.progress if state else True
    seen = 0
    with tqdm(
        total=total, desc=description, unit="batch", disable=None if progress else True, leave=False
    ) as bar:
        for index, batch in enumerate(iterator):
            if num_batches is not None and index >= num_batches:
                break
            yield tuple(item.to(device) for item in batch_inputs(batch, count, index))
            seen += 1
            bar.update(1)
    if seen == 0:
        raise CalibrationError(
            "calibration data is empty: give at least one batch (a few hundred images is typical)."
        )


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
    budget = state.config.bias_calibration_samples if state.config.bias_calibration else 0
    try:
        with torch.no_grad():
            for inputs in iterate_batches(model, data, num_batches, "calibrate"):
                model(*inputs)
                if kept_samples < budget:
                    kept.append(inputs)
                    kept_samples += inputs[0].shape[0] if inputs[0].dim() else 1
        for _, quantizer in calibration_quantizers(model):
            if quantizer.observed:
                quantizer.compute_exponent()
        if state.config.bias_calibration:
            calibrate_biases(model, kept, state.config.progress)
    finally:
        model.train(was_training)
    return model
