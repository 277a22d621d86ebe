"""TIDL open-source-runtime compile options for an exported model, and TIDL constraint checks.

TIDL's ONNX Runtime / TFLite delegates take their compile options as a flat dict of strings and
numbers; quantfx writes it as JSON beside the model so that the compile step reads exactly the
bit widths the model was quantized with. The 16-bit name lists hold ONNX tensor names (the
output names of layers as they appear in the exported file), read after emission from each
quantizer's and each layer's own `bits` and the FX-to-ONNX name map, so per-layer 16 bit works
without any extra configuration.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from quantfx.layers import IntegerLayer
from quantfx.ops import FUSABLE_ACTIVATIONS
from quantfx.passes.graph_utils import module_of
from quantfx.quantizers import FrozenQuantizer
from quantfx.tidl.profiles import PROFILES, DeviceProfile

POWER_OF_2_SCALE_TYPE = 1
"""`advanced_options:quantization_scale_type` for power-of-2 scales (TDA4VM-compatible): what
the legacy Clip-range files need on every device [T11.2 QAT section]."""


@dataclass
class BitWidths:
    """Which ONNX tensors carry 16-bit features or come from layers with 16-bit parameters."""

    feature_bits: dict[str, int] = field(default_factory=dict)
    """Layer output tensor name -> bits of the quantizer that quantizes it."""
    param_bits: dict[str, int] = field(default_factory=dict)
    """Layer output tensor name -> bits of that layer's weights."""

    def tensor_bits(self) -> int:
        """The base `tensor_bits`: 16 only when every feature and every parameter is 16 bit."""
        widths = list(self.feature_bits.values()) + list(self.param_bits.values())
        return 16 if widths and all(bits == 16 for bits in widths) else 8

    def sixteen_bit_features(self) -> list[str]:
        return sorted(name for name, bits in self.feature_bits.items() if bits == 16)

    def sixteen_bit_params(self) -> list[str]:
        return sorted(name for name, bits in self.param_bits.items() if bits == 16)


def bit_widths(model: fx.GraphModule, emitted: Iterable[fx.Node],
               names: dict[fx.Node, Any]) -> BitWidths:
    """The bit widths TIDL must be told about, from the converted graph's emitted nodes and
    their ONNX names: each quantizer's width under the name of the tensor it quantizes, each
    layer's weight width under its own output name and, when an activation is fused into it,
    the activation's too (TIDL names a merged conv+relu layer after the relu)."""
    widths = BitWidths()
    for node in emitted:
        module = module_of(model, node)
        if isinstance(module, FrozenQuantizer):
            feeder = node.args[0]
            key = names[feeder] if isinstance(feeder, fx.Node) else node.name
            widths.feature_bits[key] = module.bits
        elif isinstance(module, IntegerLayer):
            widths.param_bits[node.name] = module.weight_bits
            if len(node.users) == 1:
                user = next(iter(node.users))
                if isinstance(module_of(model, user), FUSABLE_ACTIVATIONS):
                    widths.param_bits[user.name] = module.weight_bits
    return widths


def compile_options(bit_widths: BitWidths, legacy: bool,
                    profile: DeviceProfile = PROFILES["generic"]) -> dict[str, Any]:
    """TIDL OSRT compile options for a quantfx export (QDQ, or legacy float with Clip ranges),
    for the target device's `profile`.

    `accuracy_level: 0` tells TIDL not to calibrate again: the ranges are in the file (as
    Q/DQ scales, or as Clip bounds in the legacy format). The scale type is the device's
    (1 power-of-2 on TDA4VM, 4 on the MMAv2 SoCs, TI's own presets for QDQ models [BM, TR]).
    """
    options: dict[str, Any] = {
        "tensor_bits": bit_widths.tensor_bits(),
        "accuracy_level": 0,
        "advanced_options:quantization_scale_type":
            POWER_OF_2_SCALE_TYPE if legacy else profile.scale_type,
    }
    if not legacy:
        options["advanced_options:prequantized_model"] = 1
    features = bit_widths.sixteen_bit_features()
    params = bit_widths.sixteen_bit_params()
    # Listed even when tensor_bits is 16 already: the lists then document every 16-bit layer.
    if features:
        options["advanced_options:output_feature_16bit_names_list"] = ",".join(features)
    if params:
        options["advanced_options:params_16bit_names_list"] = ",".join(params)
    return options
