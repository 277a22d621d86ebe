"""Post-training calibration: `prepare` a float model, `calibrate` its quantization ranges."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from quantfx.checks import check_int
from quantfx.config import QuantConfig, resolve_config
from quantfx.distributed import merge_ranks, shows_progress, total_over_ranks, world_size
from quantfx.errors import CalibrationError, NonFiniteError, PrepareError, QuantFxError, warn
from quantfx.frontend import build_graph, input_shapes, require_layers, warn_unexportable
from quantfx.inputs import (
    check_calibration_batch,
    describe_tensor,
    first_samples,
    parameter_dtype_device,
    require_float32,
)
from quantfx.layers import FakeQuantLayer, with_bias
from quantfx.partial import prepare_parts, quantized_parts, run_batch, whole_or_parts
from quantfx.passes.batchnorm_scale import absorb_batchnorm_scales
from quantfx.passes.equalize import equalize
from quantfx.passes.fuse import batchnorm_layers, fold_batchnorm, fold_batchnorm_forward
from quantfx.passes.grid_alignment import align_bounded_activations, check_loaded_alignment
from quantfx.passes.place import place_quantizers
from quantfx.passes.unshare import untie_parameters
from quantfx.ptc.bias_calibration import calibrate_biases
from quantfx.ptc.calibration_check import CHECK_SAMPLES, check_calibration, output_rows
from quantfx.ptc.error_feedback import error_feedback_rounding
from quantfx.ptc.learned_rounding import MAX_SAMPLES as ROUNDING_SAMPLES
from quantfx.ptc.learned_rounding import learn_rounding, restore_float_parameters
from quantfx.ptc.mixed_precision import (
    follow_loaded_widths,
    restore_placed_widths,
    widen_sensitive_layers,
)
from quantfx.ptc.weight_search import choose_weight_exponents, fit_bias_exponents
from quantfx.quantizers import (
    QuantizerFactory,
    calibration_quantizers,
    named_non_finite,
    set_quant_mode,
)
from quantfx.state import (
    FLOAT,
    PREPARED,
    PTC,
    QAT,
    QuantState,
    attach_state,
    require_state,
    state_of,
    unwrap,
)

LOG = logging.getLogger(__name__)

QAT_HINT = ("A QAT model estimates its ranges while it trains; to start QAT from calibrated "
           "ranges, calibrate the prepared model and pass it to quantfx.prepare_qat.")


def prepare(
    model: nn.Module, example_inputs: Any, config: QuantConfig | None = None
) -> fx.GraphModule:
    """An eval-mode copy of `model` with observers on every tensor the engine quantizes.

    BatchNorm is folded into the preceding conv/linear. Forward passes (under `torch.no_grad()`)
    record ranges; `calibrate` is the convenience loop; `convert` freezes the result.
    """
    config = whole_or_parts(model, example_inputs, resolve_config(config))
    if config.quantize_only:
        return _prepare_parts(model, example_inputs, config)
    graph_module, inputs = build_graph(model, example_inputs, config, training=False)
    fold_batchnorm(graph_module)
    # a BN after a ReLU hands its scale to the layer before the ReLU: a sign and a shift remain
    absorb_batchnorm_scales(graph_module, QuantizerFactory(config).per_channel)
    fold_batchnorm_forward(graph_module)  # a BN after a ReLU into the (unpadded) conv after it
    batchnorm_layers(graph_module)  # the BatchNorms left: per-channel affine layers
    untie_parameters(graph_module)
    if config.equalizes:
        equalize(graph_module)  # each call site is its own engine layer, with its own bias
    if config.align_bounded_activations:
        align_bounded_activations(graph_module, config.activation_bits, config.weight_bits,
                                  QuantizerFactory(config).per_channel)

    def weight_layer(layer: nn.Module, bn: None, quantizer: nn.Module) -> FakeQuantLayer:
        return FakeQuantLayer(with_bias(layer) if config.bias_calibration else layer, quantizer)

    count = place_quantizers(graph_module, QuantizerFactory(config), weight_layer)
    require_layers(count, model)
    warn_unexportable(graph_module)
    graph_module.to(inputs[0].device)  # the new quantizers go where the model lives
    set_quant_mode(graph_module, observe=True, quantize=False)
    attach_state(graph_module, QuantState(config, PTC, PREPARED, input_shapes(inputs)))
    graph_module.register_load_state_dict_post_hook(follow_loaded_widths)
    graph_module.register_load_state_dict_post_hook(check_loaded_alignment)
    return graph_module.eval()


def _prepare_parts(model: nn.Module, example_inputs: Any, config: QuantConfig) -> nn.Module:
    """`prepare` of a partly quantized model: each part prepared on the inputs it gets."""
    require_state(model, "prepare", PrepareError, (FLOAT,), "the float model (a torch.nn.Module)",
                  "Prepare the original float model instead.")
    working, described, count = prepare_parts(model, example_inputs, config, prepare, False)
    attach_state(working, QuantState(config, PTC, PREPARED, [], parts=described,
                                     input_count=count))
    return working.eval()


def batch_inputs(batch: Any, count: int, index: int, what: str = "calibration"
                 ) -> tuple[torch.Tensor, ...]:
    """The model inputs inside one batch of `what` data (a tensor, or a tuple like (x, label))."""
    if isinstance(batch, torch.Tensor):
        items: tuple = (batch,)
    elif isinstance(batch, (tuple, list)):
        items = tuple(batch[:count])
    else:
        raise CalibrationError(
            f"{what} batch {index} is a {type(batch).__name__}; give tensors, or tuples "
            f"whose first {count} item(s) are the model's inputs (e.g. (images, labels))."
        )
    if len(items) != count:
        raise CalibrationError(
            f"{what} batch {index} holds {len(items)} tensor(s) but the model was prepared "
            f"with {count} input(s): give tuples whose first {count} items are its inputs.")
    return items


def iterate_batches(
    model: fx.GraphModule, data: Iterable, num_batches: int | None, description: str,
    local: bool = False, what: str = "calibration"
) -> Iterable[tuple[torch.Tensor, ...]]:
    """Yield each batch's inputs (checked, on the model's device), with a progress bar.

    `local`: no bar and no collective (a training loop under torch.distributed, where each
    rank's passes end at different steps); the data must be non-empty on this rank. `what`
    names the data in errors ("calibration", "distill")."""
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
              disable=None if shows_progress(state.config).progress and not local else True
              ) as bar:
        for index, batch in enumerate(iterator):
            if num_batches is not None and index >= num_batches:
                break
            items = batch_inputs(batch, len(shapes), index, what)
            check_calibration_batch(items, shapes, dtype, index, what)
            if state.config.nonnegative_inputs and not warned and any(
                    bool((item < 0).any()) for item in items):
                warned = True
                warn(
                    f"{what} batch {index} has negative inputs although "
                    "QuantConfig(nonnegative_inputs=True) quantizes the inputs unsigned: they "
                    "will be clipped to 0. Leave nonnegative_inputs off for normalized data.")
            yield index, tuple(item.to(device) for item in items)
            seen += 1
            bar.update(1)
    if (seen if world_size() == 1 or local else total_over_ranks(seen)) == 0:
        raise CalibrationError(
            "calibration data is empty: give at least one batch (a few hundred images is typical)."
        )


def _run_batch(model: fx.GraphModule, inputs: tuple[torch.Tensor, ...], index: int) -> Any:
    try:
        return model(*inputs)
    except NonFiniteError as error:
        raise named_non_finite(model, error) from None
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
    once per layer depth, to correct the biases (a model calibrated at several input sizes:
    the batches of the first batch's size). Returns the same model
    (the one inside a DistributedDataParallel wrapper).
    """
    model = unwrap(model)  # a DistributedDataParallel wrapper, as convert takes it
    given = state_of(model)
    hint = QAT_HINT if given is not None and given.backend == QAT else ""
    state = require_state(model, "calibrate", CalibrationError, ((PTC, PREPARED),),
                          "a model returned by quantfx.prepare", hint)
    if quantized_parts(state):
        return _calibrate_parts(model, state, data, num_batches)
    require_float32(model, "calibrate", CalibrationError)
    was_training = model.training
    model.eval()
    set_quant_mode(model, observe=True, quantize=False)
    kept: list[tuple[torch.Tensor, ...]] = []
    kept_samples = 0
    budget = _kept_samples(state.config)
    float_outputs: list[list[torch.Tensor]] = []  # for the check at the end
    checked = 0
    restore_float_parameters(model)  # a second calibration starts from the float model
    restore_placed_widths(model)  # and measures afresh which layers need 16 bit
    state.calibration_failed = True  # until this call finishes
    try:
        with torch.no_grad():
            for index, inputs in iterate_batches(model, data, num_batches, "calibrate"):
                output = _run_batch(model, inputs, index)
                if not shaped_like(inputs, kept):
                    continue  # observed; kept batches must stack (reconstruction, the check)
                if kept_samples < budget:
                    kept.append(tuple(tensor[:budget - kept_samples] for tensor in inputs))
                    kept_samples += kept[-1][0].shape[0]
                if checked < CHECK_SAMPLES:
                    rows = min(inputs[0].shape[0], CHECK_SAMPLES - checked)
                    float_outputs.append(output_rows(output, rows))
                    checked += rows
        if world_size() > 1:  # torch.distributed: as one process on every rank's data
            kept, float_outputs = merge_ranks(model, kept, float_outputs, budget, CHECK_SAMPLES,
                                              parameter_dtype_device(model)[1])
        _finish_calibration(model, shows_progress(state.config), kept)
        checks = [tuple(tensor[:len(outputs[0]) if outputs else 0] for tensor in inputs)
                  for inputs, outputs in zip(kept, float_outputs)]
        state.calibration_failed = False
        state.calibration_check = check_calibration(model, checks, float_outputs,
                                                    state.measured_sixteen_bit)
        if state.calibration_check is not None:
            LOG.info(state.calibration_check.summary())
        simulate_quantized(model)
    finally:
        model.train(was_training)
    return model


def simulate_quantized(model: nn.Module) -> None:
    """After calibration every quantizer quantizes and none observes: the calibrated model's
    forward is the quantized model's (float biases aside), and running it (to check it) no
    longer moves the ranges that bias calibration, rounding and 16-bit choices were made for."""
    for _, quantizer in calibration_quantizers(model):
        quantizer.set_mode(observe=False, quantize=quantizer.observed)


def shaped_like(inputs: tuple[torch.Tensor, ...], kept: list[tuple[torch.Tensor, ...]]) -> bool:
    """Whether a batch's samples have the shapes of the first kept batch's (or none is kept):
    a fully convolutional model calibrated at several input sizes keeps the first size's
    batches for bias calibration, weight rounding and the check, which stack them."""
    return not kept or all(tensor.shape[1:] == first.shape[1:]
                           for tensor, first in zip(inputs, kept[0]))


def _kept_samples(config: QuantConfig) -> int:
    """How many samples calibration keeps for bias calibration and weight rounding."""
    return max(config.bias_calibration_samples if config.bias_calibration else 0,
               ROUNDING_SAMPLES if config.rounding != "nearest" else 0, CHECK_SAMPLES)


def _finish_calibration(model: fx.GraphModule, config: QuantConfig,
                        kept: list[tuple[torch.Tensor, ...]]) -> None:
    """After the observing passes: every exponent, then learned rounding and bias
    calibration on the kept samples."""
    for _, quantizer in calibration_quantizers(model):
        if quantizer.observed:
            quantizer.compute_exponent()
    fit_bias_exponents(model, config.profile.bias_bits_for)  # TDA4VM's 16-bit biases
    # before the output-error search, which then skips the widened layers (measured on the
    # real models: EfficientNet-Lite2 19.47 dB this way, 18.82 with the search first)
    state_of(model).measured_sixteen_bit = widen_sensitive_layers(model, config, kept)
    choose_weight_exponents(model, kept)  # by each layer's output error, where MSE-observed
    fit_bias_exponents(model, config.profile.bias_bits_for)
    bias_samples = config.bias_calibration_samples if config.bias_calibration else 0
    if config.rounding == "learned":  # bias calibration in the same pass
        learn_rounding(model, kept, config.progress, bias_samples=bias_samples)
    elif config.rounding == "error_feedback":
        error_feedback_rounding(model, kept, config.progress, bias_samples=bias_samples)
    elif config.bias_calibration:
        calibrate_biases(model, first_samples(kept, config.bias_calibration_samples),
                         config.progress)


def _calibrate_parts(model: nn.Module, state: QuantState, data: Iterable,
                     num_batches: int | None) -> nn.Module:
    """`calibrate` of a partly quantized model: the whole model runs on every batch while each
    part's observers record; each part keeps the inputs it received for its finishing steps."""
    names = quantized_parts(state)
    parts = {name: model.get_submodule(name) for name in names}
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise CalibrationError(f"calibration data must be an iterable of batches (e.g. a "
                               f"DataLoader or a list of tensors), got {type(data).__name__}.")
    if num_batches is not None:
        check_int(num_batches, "num_batches", 1, CalibrationError, "10, or None for all")
    was_training = model.training
    model.eval()
    for part in parts.values():
        restore_float_parameters(part)
        restore_placed_widths(part)
        set_quant_mode(part, observe=True, quantize=False)
        state_of(part).calibration_failed = True
    state.calibration_failed = True
    budget = _kept_samples(state.config)
    kept, handles = _keep_part_inputs(parts, budget)
    try:
        seen = _observe_whole(model, state, data, num_batches)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if world_size() > 1:  # torch.distributed: as one process on every rank's data
        seen = total_over_ranks(seen)
        for name, part in parts.items():
            kept[name] = merge_ranks(part, kept[name], [], budget, 0,
                                     parameter_dtype_device(part)[1])[0]
    if seen == 0:
        raise CalibrationError("calibration data is empty: give at least one batch.")
    for name, part in parts.items():
        if not kept[name]:
            raise CalibrationError(f"part {name!r} never ran during calibration: check that "
                                   "the batches reach it (a detector needs images with the "
                                   "objects' sizes it expects).")
        _finish_calibration(part, shows_progress(state.config), kept[name])
        simulate_quantized(part)
        state_of(part).calibration_failed = False
    state.calibration_failed = False
    return model


def _keep_part_inputs(parts: dict[str, nn.Module], budget: int
                      ) -> tuple[dict[str, list[tuple[torch.Tensor, ...]]], list[Any]]:
    """Hooks that keep each part's first `budget` input samples; (kept inputs, hooks)."""
    kept: dict[str, list[tuple[torch.Tensor, ...]]] = {name: [] for name in parts}
    counts = dict.fromkeys(parts, 0)

    def keeper(name: str):
        def keep(module: nn.Module, args: tuple) -> None:
            tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
            if counts[name] < budget and shaped_like(tensors, kept[name]):
                kept[name].append(tuple(a.detach()[:budget - counts[name]] for a in args))
                counts[name] += kept[name][-1][0].shape[0] if kept[name][-1][0].dim() else 1
        return keep

    return kept, [part.register_forward_pre_hook(keeper(name)) for name, part in parts.items()]


def _observe_whole(model: nn.Module, state: QuantState, data: Iterable,
                   num_batches: int | None) -> int:
    """Run the whole partly quantized model over `data` (its parts observe); the batch count."""
    seen = 0
    with torch.no_grad():
        for index, batch in enumerate(tqdm(data, desc="calibrate", unit="batch", leave=False,
                                           disable=None if shows_progress(
                                               state.config).progress else True)):
            if num_batches is not None and index >= num_batches:
                break
            try:
                run_batch(model, batch, state.input_count)
            except NonFiniteError as error:
                raise named_non_finite(model, error) from None
            except QuantFxError:
                raise
            except Exception as error:  # noqa: BLE001 - the model rejected the batch
                raise CalibrationError(
                    f"the model fails on calibration batch {index}: {type(error).__name__}: "
                    f"{(str(error).splitlines() or [''])[0][:300]}") from error
            seen += 1
    return seen
