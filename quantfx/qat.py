"""Quantization-aware training: `prepare_qat` turns a float (or calibrated) model into a
train-mode GraphModule that the user's own loop fine-tunes through power-of-2 fake quantizers.

What a training forward does:

- conv/linear + BatchNorm is one `QATLayer`. While BN statistics are live it folds BN on the fly
  as torch.ao's ConvBn does (Krishnamoorthi 2018, section 3.2): the weight is scaled by
  ``gamma / sqrt(running_var + eps)``, fake-quantized, the conv output is scaled back and the
  BatchNorm itself normalizes with batch statistics (so running statistics keep updating). Once BN
  is frozen (schedule) and in `eval()`, the layer runs the folded conv exactly as `convert` builds
  it, bias on the int32 grid included, so eval and converted models agree bit for bit.
- activations go through `QATFakeQuantize`: an exponential moving average of each batch's
  min/max (PACT2's "running average" range statistic, all-reduced across DDP ranks), rounded up to
  a power of 2, then clipped and fake-quantized with the clipped straight-through estimator.
- a `QATController` node counts train-mode forwards and applies the `QATSchedule` (freeze BN
  statistics, then freeze ranges). Every piece of state lives in buffers, so `state_dict()`
  round-trips QAT exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import Tensor, nn

from quantfx.config import QuantConfig
from quantfx.convert import INT32_MAX, INT32_MIN, _fit_bias
from quantfx.errors import ConfigError, PrepareError
from quantfx.fake_quant import FakeQuantize
from quantfx.frontend import (
    QuantState,
    attach_state,
    build_graph,
    check_config,
    input_shapes,
    require_layers,
    state_of,
)
from quantfx.modules import WEIGHT_LAYERS, QuantLayer, layer_forward
from quantfx.observers import MovingAverageMinMaxObserver, make_observer
from quantfx.passes.fuse import foldable_pair, set_submodule
from quantfx.passes.graph_utils import module_of
from quantfx.passes.place import input_quantizer, place_quantizers, weight_quantizer
from quantfx.qmath import dequantize, exponent_for_max, fake_quantize, quantize

CONTROLLER_NAME = "qat_controller"


@dataclass
class QATSchedule:
    """When QAT freezes BatchNorm statistics and then quantizer ranges, plus its weight clipping.

    Steps count train-mode forwards of the prepared model (automatic); epochs count calls of
    `end_qat_epoch(model)` (once at the end of each epoch). N means "after N": with
    ``freeze_bn_step=100`` BN statistics update in steps 1..100 and are frozen from step 101;
    with ``freeze_bn_epoch=2`` they update in epochs 1 and 2 and are frozen from epoch 3.
    None never freezes by that counter; 0 freezes at once.
    """

    freeze_bn_step: int | None = None
    """Train-mode forwards after which BN uses (and stops updating) its running statistics."""
    freeze_ranges_step: int | None = None
    """Train-mode forwards after which activation ranges stop updating."""
    freeze_bn_epoch: int | None = None
    """Epochs (calls of `end_qat_epoch`) after which BN statistics freeze."""
    freeze_ranges_epoch: int | None = None
    """Epochs after which activation ranges freeze."""
    weight_clip_std: float | None = 4.0
    """One-time clip at `prepare_qat` of BN-folded weights beyond this many standard deviations
    (of their tensor, or channel when per-channel): tames outliers that would otherwise waste
    most of a power-of-2 per-tensor range (measured: per-tensor depthwise MobileNetV2-style QAT
    89.5% at 12, 91.6% at 4, float 91.5%). None disables it."""

    def __post_init__(self) -> None:
        for name in (
            "freeze_bn_step",
            "freeze_ranges_step",
            "freeze_bn_epoch",
            "freeze_ranges_epoch",
        ):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise ConfigError(
                    f"QATSchedule.{name}={value!r} must be a non-negative integer or None "
                    "(e.g. freeze_bn_step=2000)."
                )
        clip = self.weight_clip_std
        if clip is not None and (not isinstance(clip, (int, float)) or clip <= 1.0):
            raise ConfigError(
                f"QATSchedule.weight_clip_std={clip!r} must be a number > 1 (e.g. 12.0) or None."
            )


def _schedule_of(config: QuantConfig) -> QATSchedule:
    schedule = getattr(config, "qat_schedule", None)
    if schedule is None:
        return QATSchedule()
    if not isinstance(schedule, QATSchedule):
        raise ConfigError(
            f"QuantConfig.qat_schedule must be a quantfx.QATSchedule or None, got "
            f"{type(schedule).__name__}."
        )
    return schedule


# --------------------------------------------------------------------------------------------
# numerics helpers


class _RoundToGridSTE(torch.autograd.Function):
    """Round onto a power-of-2 grid exactly as `convert` does, with an identity gradient."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, exponent: Tensor, qmin: int, qmax: int, axis: int | None
    ) -> Tensor:
        return dequantize(quantize(x, exponent, qmin, qmax, axis), exponent, axis).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        return grad, None, None, None, None


class _FakeQuantizeSTE(torch.autograd.Function):
    """Training-time fake quantization: the values of `qmath.fake_quantize`, computed faster.

    torch's fused CPU fake-quant kernel rounds element by element with `nearbyint` (measured
    here: 28 ms for a 3M-element tensor); multiply, round (half to even), clamp, multiply by a
    power of 2 give the same bits in about 6 ms. The backward is the clipped STE: the gradient
    passes where x rounds inside [qmin, qmax] (one fused `hardtanh_backward`), or everywhere
    when `clip_gradient` is False (weights, whose exponent never clips).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, exponent: Tensor, qmin: int, qmax: int,
                axis: int | None, clip_gradient: bool) -> Tensor:
        scale = torch.exp2(exponent.detach().to(x.dtype))
        if axis is not None:
            shape = [1] * x.dim()
            shape[axis] = -1
            scale = scale.reshape(shape)
        output = torch.mul(x, torch.reciprocal(scale))
        output.round_().clamp_(qmin, qmax).mul_(scale)
        ctx.clip = None
        if clip_gradient and axis is None:
            step = float(scale)
            ctx.clip = ((qmin - 0.5) * step, (qmax + 0.5) * step)
            ctx.save_for_backward(x)
        return output

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.clip is None:
            return grad, None, None, None, None, None
        (x,) = ctx.saved_tensors
        low, high = ctx.clip
        return torch.ops.aten.hardtanh_backward(grad, x, low, high), None, None, None, None, None


def fake_quantize_ste(x: Tensor, exponent: Tensor, qmin: int, qmax: int,
                      axis: int | None = None, clip_gradient: bool = True) -> Tensor:
    """`qmath.fake_quantize` for training: same values, faster on CPU, clipped STE gradient."""
    if axis is not None and clip_gradient:
        return fake_quantize(x, exponent, qmin, qmax, axis)
    return _FakeQuantizeSTE.apply(x, exponent, qmin, qmax, axis, clip_gradient)


def bias_to_int32_grid(bias: Tensor, exponent: Tensor, axis: int | None) -> Tensor:
    """The bias on the int32 grid at `exponent` (input + weight exponent), straight-through."""
    return _RoundToGridSTE.apply(bias, exponent, INT32_MIN, INT32_MAX, axis)


def weight_exponent(weight: Tensor, qmax: int, axis: int | None) -> Tensor:
    """Never-clipping power-of-2 exponent(s) of the current weight (per tensor or channel 0).

    The same numbers a fresh min/max observer proposes, which is what `convert` uses.
    """
    magnitude = weight.detach().abs()
    if axis is None:
        return exponent_for_max(magnitude.max(), qmax)
    return exponent_for_max(magnitude.flatten(1).amax(dim=1), qmax)


def _sigma_clipped_std(rows: Tensor, num_std: float) -> Tensor:
    """Standard deviation of each row, recomputed without the values beyond `num_std` of it.

    One round of sigma clipping: a single extreme outlier inflates the plain std (and so its
    own clip limit); the second pass measures the spread of the ordinary weights.
    """
    std = rows.std(dim=1, keepdim=True)
    keep = (rows.abs() <= num_std * std).to(rows.dtype)
    count = keep.sum(dim=1, keepdim=True).clamp(min=2)
    mean = (rows * keep).sum(dim=1, keepdim=True) / count
    variance = (((rows - mean) * keep) ** 2).sum(dim=1, keepdim=True) / (count - 1)
    return variance.sqrt().squeeze(1)


def _reduce_min_max(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """Global min/max over all DDP ranks (identity when torch.distributed is not running)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return low, high
    pair = torch.stack([-low, high])
    dist.all_reduce(pair, op=dist.ReduceOp.MAX)
    return -pair[0], pair[1]


# --------------------------------------------------------------------------------------------
# modules


class QATFakeQuantize(FakeQuantize):
    """Activation quantizer for QAT: moving-average range (DDP-reduced), STE fake quantization.

    Ranges update only in train mode with `observer_enabled`; `eval()` uses the current exponent.
    """

    def __init__(self, bits: int, signed: bool, momentum: float = 0.1) -> None:
        super().__init__(MovingAverageMinMaxObserver(momentum=momentum), bits, signed)
        self.set_mode(observe=True, quantize=True)

    def start_from_exponent(self, exponent: float) -> None:
        """Start the running range at the clip value of `exponent` (e.g. from calibration)."""
        clip = self.qmax * 2.0 ** float(exponent)
        self.observer.min_val.fill_(-clip if self.signed else 0.0)
        self.observer.max_val.fill_(clip)
        self.observer.observed.fill_(True)
        self.compute_exponent()

    def forward(self, x: Tensor) -> Tensor:
        if self.training and bool(self.observer_enabled) and x.numel() > 0:
            low, high = torch.aminmax(x.detach().float())
            low, high = _reduce_min_max(low, high)
            self.observer(torch.stack([low, high]))
            self.compute_exponent()
        if not bool(self.quant_enabled) or not bool(self.observer.observed):
            return x
        if self.training:
            return fake_quantize_ste(x, self.exponent, self.qmin, self.qmax)
        return fake_quantize(x, self.exponent, self.qmin, self.qmax)


class QATLayer(QuantLayer):
    """conv/linear (+ optional BatchNorm folded on the fly) with a fake-quantized weight.

    Train mode with live BN: torch.ao-style ConvBn (weight scaled by gamma/running_std and
    fake-quantized, output rescaled, BN with batch statistics). Frozen BN or eval: the BN-folded
    conv with running statistics, weight fake-quantized and bias on the int32 grid of input
    exponent + weight exponent, exactly as `convert` computes it.
    """

    def __init__(
        self,
        layer: nn.Module,
        bn: nn.Module | None,
        weight_quantizer: FakeQuantize,
        input_quantizer: FakeQuantize | None = None,
    ) -> None:
        super().__init__(layer, weight_quantizer)
        self.bn = bn
        self.register_buffer("bn_frozen", torch.tensor(False))
        # A plain reference (not a submodule): the quantizer is owned by the graph module.
        self.__dict__["input_quantizer"] = input_quantizer

    def extra_repr(self) -> str:
        return f"bn={'yes' if self.bn is not None else 'no'}"

    def _channel_shape(self, dims: int) -> list[int]:
        shape = [1] * dims
        shape[1 if dims > 1 else 0] = -1
        return shape

    def folded_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """Weight and bias with BN folded by its running statistics (torch's fusion formula)."""
        weight, bias = self.layer.weight, self.layer.bias
        bn = self.bn
        if bn is None:
            return weight, bias
        if bias is None:
            bias = torch.zeros_like(bn.running_mean)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        var_rsqrt = torch.rsqrt(bn.running_var + bn.eps)
        shape = [-1, 1] + [1] * (weight.dim() - 2)
        folded_weight = (weight * (gamma * var_rsqrt).reshape(shape)).to(weight.dtype)
        folded_bias = ((bias - bn.running_mean) * var_rsqrt * gamma + beta).to(weight.dtype)
        return folded_weight, folded_bias

    @property
    def quantizing(self) -> bool:
        """Whether this forward fake-quantizes the weight (and bias)."""
        return bool(self.weight_quantizer.quant_enabled)

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None and self.training and not bool(self.bn_frozen):
            return self._forward_live_bn(x)
        return self._forward_folded(x)

    def _quantize_weight(self, weight: Tensor, exponent: Tensor) -> Tensor:
        quantizer = self.weight_quantizer
        if not self.training:
            return fake_quantize(weight, exponent, quantizer.qmin, quantizer.qmax, quantizer.axis)
        quantizer.exponent.copy_(exponent)  # a record of the last training step's exponent
        return fake_quantize_ste(weight, exponent, quantizer.qmin, quantizer.qmax,
                                 quantizer.axis, clip_gradient=False)

    def _forward_folded(self, x: Tensor) -> Tensor:
        weight, bias = self.folded_weight_bias()
        quantizer = self.input_quantizer
        if not self.quantizing:
            return layer_forward(self.layer, x, weight, bias)
        exponent = weight_exponent(weight, self.weight_quantizer.qmax, self.weight_quantizer.axis)
        input_ready = quantizer is not None and bool(quantizer.quant_enabled) and quantizer.observed
        if bias is not None and input_ready:
            exponent = _fit_bias(exponent, quantizer.exponent, bias)
            bias_exponent = quantizer.exponent + exponent
            bias = bias_to_int32_grid(bias, bias_exponent, 0 if bias_exponent.dim() else None)
        return layer_forward(self.layer, x, self._quantize_weight(weight, exponent), bias)

    def _forward_live_bn(self, x: Tensor) -> Tensor:
        bn = self.bn
        running_std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(running_std)
        # Detached: the forward is torch.ao's ConvBn; the gradient drops only the small term
        # d/dgamma of the weight's quantization error (BN's own affine still trains gamma), and
        # the output rescale becomes one multiply instead of a division with a reduction.
        scale = (gamma / running_std).detach()
        weight = self.layer.weight * scale.reshape([-1] + [1] * (self.layer.weight.dim() - 1))
        if self.quantizing:
            quantizer = self.weight_quantizer
            weight = self._quantize_weight(
                weight, weight_exponent(weight, quantizer.qmax, quantizer.axis)
            )
        output = layer_forward(self.layer, x, weight, None)
        shape = self._channel_shape(output.dim())
        output = output * torch.reciprocal(scale).reshape(shape)
        if self.layer.bias is not None:
            output = output + self.layer.bias.reshape(shape)
        return bn(output)

    def freeze_bn(self) -> None:
        """Stop updating BN statistics; from now on train with the running ones, folded."""
        self.bn_frozen.fill_(True)

    def clip_weight_outliers(self, num_std: float) -> int:
        """One-time clip of folded weights beyond `num_std` standard deviations; returns count."""
        with torch.no_grad():
            folded, _ = self.folded_weight_bias()
            raw = self.layer.weight
            fold_scale = folded / torch.where(raw == 0, torch.ones_like(raw), raw)
            if self.weight_quantizer.axis is None:
                limit = num_std * _sigma_clipped_std(folded.reshape(1, -1), num_std)
            else:
                limit = num_std * _sigma_clipped_std(folded.flatten(1), num_std)
                limit = limit.reshape([-1] + [1] * (folded.dim() - 1))
            outliers = folded.abs() > limit
            count = int(outliers.sum())
            if count:
                clipped = torch.maximum(torch.minimum(folded, limit), -limit) / fold_scale
                raw.copy_(torch.where(outliers, clipped, raw))
            return count

    def to_quant_layer(self) -> QuantLayer:
        """The PTC-style `QuantLayer` of the BN-folded layer, for `convert`."""
        weight, bias = self.folded_weight_bias()
        folded = copy.deepcopy(self.layer)
        folded.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if bias is not None:
            folded.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        quantizer = self.weight_quantizer
        observer = make_observer(
            "minmax",
            axis=quantizer.axis,
            channels=quantizer.observer.min_val.numel() if quantizer.axis is not None else 1,
        )
        fresh = FakeQuantize(observer, quantizer.bits, signed=True, axis=quantizer.axis)
        fresh.observer(folded.weight)
        fresh.compute_exponent()
        return QuantLayer(folded.eval(), fresh)


class QATController(nn.Module):
    """Counts train-mode forwards (and epochs) in buffers and applies the `QATSchedule`.

    It is the first node of the QAT graph (no inputs, no users), so it runs once per forward.
    """

    _is_impure = True  # keep fx's dead-code elimination away from it

    def __init__(self, schedule: QATSchedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("epoch", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("bn_frozen", torch.tensor(False))
        self.register_buffer("ranges_frozen", torch.tensor(False))
        self.__dict__["layers"] = []
        self.__dict__["activation_quantizers"] = []

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}"

    def forward(self) -> None:
        if self.training:
            self.step += 1
            self.apply_schedule()

    def end_epoch(self) -> None:
        """Count one finished epoch and apply epoch-based freezes."""
        self.epoch += 1
        self.apply_schedule()

    def apply_schedule(self) -> None:
        """Freeze BN statistics / ranges once their step or epoch count is exceeded."""
        step, epoch, schedule = int(self.step), int(self.epoch), self.schedule

        def due(step_limit: int | None, epoch_limit: int | None) -> bool:
            return (step_limit is not None and step > step_limit) or (
                epoch_limit is not None and epoch >= epoch_limit
            )

        if not bool(self.bn_frozen) and due(schedule.freeze_bn_step, schedule.freeze_bn_epoch):
            freeze_batchnorm(self)
        if not bool(self.ranges_frozen) and due(
            schedule.freeze_ranges_step, schedule.freeze_ranges_epoch
        ):
            freeze_ranges(self)


def _controller(model: nn.Module) -> QATController:
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    controller = getattr(module, CONTROLLER_NAME, None)
    if not isinstance(controller, QATController):
        raise ConfigError(
            f"expected a model returned by quantfx.prepare_qat (or its DDP wrapper), got "
            f"{type(module).__name__}."
        )
    return controller


def freeze_batchnorm(model: nn.Module) -> None:
    """Freeze BN statistics of every QAT layer now (the schedule does this automatically)."""
    controller = model if isinstance(model, QATController) else _controller(model)
    for layer in controller.layers:
        layer.freeze_bn()
    controller.bn_frozen.fill_(True)


def freeze_ranges(model: nn.Module) -> None:
    """Freeze every activation range now: exponents stop following the data."""
    controller = model if isinstance(model, QATController) else _controller(model)
    for quantizer in controller.activation_quantizers:
        if quantizer.observed:
            quantizer.compute_exponent()
        quantizer.observer_enabled.fill_(False)
    controller.ranges_frozen.fill_(True)


def end_qat_epoch(model: nn.Module) -> None:
    """Tell a QAT model that one epoch finished (call once per epoch for epoch schedules)."""
    _controller(model).end_epoch()


# --------------------------------------------------------------------------------------------
# graph construction


def _weight_quantizer(layer: nn.Module, config: QuantConfig) -> FakeQuantize:
    """QAT weights: the never-clipping exponent of the current weight, quantized every forward."""
    quantizer = weight_quantizer(layer, config, observer_kind="minmax")
    quantizer.set_mode(observe=False, quantize=True)
    return quantizer


def _wrap_layers(graph_module: fx.GraphModule, config: QuantConfig) -> int:
    """Replace each conv/linear (+ its BatchNorm) by a `QATLayer`; return how many."""
    count = 0
    for node in list(graph_module.graph.nodes):
        # QATLayer folds BN along weight axis 0: a transposed conv keeps its BN separate.
        producer = foldable_pair(graph_module, node, transposed=False)
        if producer is not None:
            layer, bn = module_of(graph_module, producer), module_of(graph_module, node)
            set_submodule(
                graph_module, producer.target, QATLayer(layer, bn, _weight_quantizer(layer, config))
            )
            producer.meta = dict(node.meta)
            node.replace_all_uses_with(producer)
            graph_module.graph.erase_node(node)
            count += 1
    for node in graph_module.graph.nodes:
        module = module_of(graph_module, node)
        if isinstance(module, WEIGHT_LAYERS) and len(node.args) == 1 and not node.kwargs:
            set_submodule(
                graph_module, node.target, QATLayer(module, None, _weight_quantizer(module, config))
            )
            count += 1
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return count


def _replace_activation_quantizers(graph_module: fx.GraphModule, config: QuantConfig) -> None:
    """Swap every activation `FakeQuantize` for a `QATFakeQuantize`, keeping calibrated ranges."""
    for node in graph_module.graph.nodes:
        old = module_of(graph_module, node)
        if isinstance(old, FakeQuantize) and not isinstance(old, QATFakeQuantize):
            new = QATFakeQuantize(old.bits, old.signed, config.moving_average_momentum)
            if old.observed:
                new.start_from_exponent(float(old.observer.exponent(old.qmax)))
            set_submodule(graph_module, node.target, new)


def _finish(
    graph_module: fx.GraphModule, config: QuantConfig, schedule: QATSchedule, state: QuantState
) -> fx.GraphModule:
    """Link layers to their input quantizers, add the schedule controller, go to train mode."""
    controller = QATController(schedule)
    graph_module.add_submodule(CONTROLLER_NAME, controller)
    graph = graph_module.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before():
        graph.call_module(CONTROLLER_NAME, args=())
    for node in graph.nodes:
        module = module_of(graph_module, node)
        if isinstance(module, QATLayer):
            quantizer = input_quantizer(graph_module, node, FakeQuantize)
            if quantizer is None:
                raise PrepareError(
                    f"internal: the input of layer '{node.target}' has no quantizer. Please "
                    "report this model to the quantfx developers."
                )
            module.__dict__["input_quantizer"] = quantizer
            controller.layers.append(module)
            if schedule.weight_clip_std is not None:
                module.clip_weight_outliers(schedule.weight_clip_std)
        elif isinstance(module, QATFakeQuantize):
            controller.activation_quantizers.append(module)
    graph.lint()
    graph_module.recompile()
    attach_state(graph_module, state)  # survives deepcopy (an EMA copy is still a QAT model)
    controller.apply_schedule()  # a schedule with 0 freezes at once
    return graph_module.train()


def prepare_qat(
    model: nn.Module, example_inputs: Any, config: QuantConfig | None = None
) -> fx.GraphModule:
    """A train-mode copy of `model` that trains through power-of-2 fake quantizers (QAT).

    `model` is a float model, or a model returned by `quantfx.prepare` (calibrated or not):
    then its BN stays folded and its calibrated ranges are the starting ranges. Train it with
    your usual loop; `eval()` and `quantfx.convert` then give identical integer-exact results.
    """
    state = state_of(model)
    if state is not None:
        return _prepare_qat_from_ptc(model, example_inputs, state)
    config = check_config(config)
    schedule = _schedule_of(config)
    graph_module, inputs = build_graph(model, example_inputs, config, training=True)
    require_layers(_wrap_layers(graph_module, config), model)
    place_quantizers(graph_module, config)
    _replace_activation_quantizers(graph_module, config)
    state = QuantState(config, "qat", "prepared", input_shapes(inputs))
    return _finish(graph_module, config, schedule, state)


def _prepare_qat_from_ptc(
    model: nn.Module, example_inputs: Any, state: QuantState
) -> fx.GraphModule:
    """QAT from a `prepare`d (ideally calibrated) model: BN stays folded, ranges carry over."""
    if state.backend != "ptc" or state.stage != "prepared":
        raise PrepareError(
            f"prepare_qat takes a float model or one returned by quantfx.prepare; this one is a "
            f"{state.stage} {state.backend} model. Start from the float model (or the prepared "
            "one) instead."
        )
    config = state.config
    graph_module = copy.deepcopy(model)
    for node in graph_module.graph.nodes:
        module = module_of(graph_module, node)
        if isinstance(module, QuantLayer) and not isinstance(module, QATLayer):
            set_submodule(
                graph_module,
                node.target,
                QATLayer(module.layer, None, _weight_quantizer(module.layer, config)),
            )
    _replace_activation_quantizers(graph_module, config)
    new_state = QuantState(config, "qat", "prepared", list(state.input_shapes))
    return _finish(graph_module, config, _schedule_of(config), new_state)


def lower_qat_layers(graph_module: fx.GraphModule) -> None:
    """For `convert`: drop the controller and fold each `QATLayer` into a plain `QuantLayer`."""
    for node in list(graph_module.graph.nodes):
        module = module_of(graph_module, node)
        if isinstance(module, QATController):
            graph_module.graph.erase_node(node)
        elif isinstance(module, QATLayer):
            set_submodule(graph_module, node.target, module.to_quant_layer())
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()


__all__ = [
    "QATController",
    "QATFakeQuantize",
    "QATLayer",
    "QATSchedule",
    "end_qat_epoch",
    "freeze_batchnorm",
    "freeze_ranges",
    "prepare_qat",
]
