"""AMD Quark as a benchmark peer: power-of-2 int8 post-training quantization in FX graph mode.

Quark (`pip install amd-quark torchao`, tested with 0.13 on torch 2.14) quantizes a
`torch.export` graph. Weights and activations are int8 symmetric with power-of-2 scales picked
by Quark's pow2 observers (`PerTensorPowOf2MinMSEObserver` by default: the min/max pow2 scale,
then the best of 5 neighbouring exponents by MSE). Biases are int32 at input x weight scale
(Quark's `AdjustBiasScaleQOPass`). Conv+BN pairs become `QuantizedConvBatchNorm2d`, which
fake-quantizes the BN-folded weight. `freeze=True` also runs Quark's pow2 hardware passes (the
Vitis DPU shift_cut/shift_bias limits, concat/pool scale alignment). `per_channel=True` runs
(pow2 scale per output channel) but scored below per-tensor on ResNet-18 in our checks.
The module imports without quark; quark is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import io
import logging
import math
import os
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from quark.torch.quantization.config.config import QConfig

OBSERVERS = ("mse", "minmax")


def quark_available() -> bool:
    """Whether `quark.torch` (with the torchao it needs for graph mode) can be imported."""
    return all(importlib.util.find_spec(name) is not None for name in ("quark", "torchao"))


def quark_version() -> str:
    """The installed amd-quark version, or "" when it is not installed."""
    try:
        return importlib.metadata.version("amd-quark")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _quiet_quark() -> None:
    """Turn Quark's INFO banners down to warnings (its loggers all share one level)."""
    from quark.common.utils.log import ScreenLogger

    ScreenLogger.set_shared_level(logging.WARNING)


def _config(per_channel: bool, observer: str) -> QConfig:
    """The Quark `QConfig`: int8 pow2 weights and activations, int32 pow2 bias, FX graph mode."""
    from quark.torch.quantization.config.config import QConfig, QLayerConfig, QTensorConfig
    from quark.torch.quantization.config.type import (
        Dtype,
        QSchemeType,
        QuantizationMode,
        RoundType,
        ScaleType,
    )
    from quark.torch.quantization.observer import observer as obs

    mse = observer == "mse"
    tensor_minmax = obs.PerTensorPowOf2MinMaxObserver
    tensor_obs = obs.PerTensorPowOf2MinMSEObserver if mse else tensor_minmax
    channel_obs = obs.PerChannelPowOf2MinMSEObserver if mse else obs.PerChannelPowOf2MinMaxObserver

    def spec(dtype: Dtype, channel: bool, observer_cls: type | None = None) -> QTensorConfig:
        """One QTensorConfig: symmetric, half-even rounding, power-of-2 scale, static."""
        return QTensorConfig(
            dtype=dtype,
            qscheme=QSchemeType.per_channel if channel else QSchemeType.per_tensor,
            ch_axis=0 if channel else None,
            observer_cls=observer_cls or (channel_obs if channel else tensor_obs),
            symmetric=True,
            scale_type=ScaleType.pof2,
            round_method=RoundType.half_even,
            is_dynamic=False,
        )

    # Quark's symmetric uint8 is the int8 grid shifted by 128, so activations stay int8.
    act = spec(Dtype.int8, False)
    # The bias observer's scale is replaced by input x weight scale after calibration; min/max
    # keeps it cheap (the MSE observer would hold a copy of every bias).
    bias_obs = obs.PerChannelPowOf2MinMaxObserver if per_channel else tensor_minmax
    layer = QLayerConfig(input_tensors=act, output_tensors=act,
                         weight=spec(Dtype.int8, per_channel),
                         bias=spec(Dtype.int32, per_channel, bias_obs))
    return QConfig(global_quant_config=layer, quant_mode=QuantizationMode.fx_graph_mode)


def quark_pow2_ptq(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor],
                   per_channel: bool = False, observer: str = "mse",
                   freeze: bool = False) -> nn.Module | None:
    """Quark pow2 int8 PTQ of (a copy of) `model`: a fake-quant GraphModule in eval mode, on CPU.

    Returns None, with a warning, when quark is missing or any step fails.
    """
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    if not quark_available():
        warnings.warn("amd-quark (with torchao) is not installed; skipping the Quark peer",
                      stacklevel=2)
        return None
    try:
        os.environ.setdefault("QUARK_LOG_LEVEL", "warning")
        # stderr only carries tqdm bars here: Quark's log handlers hold their own stream.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            from quark.torch import ModelQuantizer

            _quiet_quark()
            float_model = copy.deepcopy(model).cpu().eval()
            graph = torch.export.export(float_model, (example.cpu(),)).module()
            quantizer = ModelQuantizer(_config(per_channel, observer))
            with torch.no_grad():
                quantized = quantizer.quantize_model(graph, [x.cpu() for x in calibration])
            if freeze:
                quantized = quantizer.freeze(quantized.eval())
            return quantized.eval()
    except Exception as error:  # a peer that fails is reported, not fatal
        warnings.warn(f"Quark pow2 PTQ failed: {type(error).__name__}: {error}", stacklevel=2)
        return None


def quantizer_scales(quantized: nn.Module) -> dict[str, torch.Tensor]:
    """The scale of every Quark fake quantizer in `quantized`, by module name."""
    return {name: module.scale.detach().flatten().clone()
            for name, module in quantized.named_modules()
            if type(module).__name__.endswith("FakeQuantize") and hasattr(module, "scale")}


def all_powers_of_2(scales: dict[str, torch.Tensor]) -> bool:
    """Whether every scale is an exact power of 2."""
    for scale in scales.values():
        exponent = torch.log2(scale.double())
        if not torch.equal(exponent, exponent.round()):
            return False
    return True


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10 of signal over error energy."""
    noise = float(((reference - approx) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((reference**2).sum()) / noise)
