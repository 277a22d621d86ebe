"""Device profiles: what each TIDL device accepts, from TI's own documents (data only).

Every fact here comes from `shared/TIDL_FACTS.md` (TI edgeai-tidl-tools 10.1-11.2,
edgeai-benchmark, edgeai-modeloptimization); `SOURCES` names where. A profile decides what
quantfx builds for a device (bias width, per-channel weights, opset, 16-bit handling), which
options file it writes, and which rules the TIDL checker applies.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCES = {
    "T11.2": "edgeai-tidl-tools docs (11.2): operators.md, quantization.md, od_meta_arch.md",
    "T11.0": "edgeai-tidl-tools rel_11_00 docs and examples/osrt_python/README.md",
    "T10.1": "edgeai-tidl-tools supported_ops_rts_versions.md (10.1)",
    "BM": "edgeai-benchmark runtime options and presets",
    "MO": "edgeai-modeloptimization quantization docs",
    "TR": "edgeai-tidlrunner runtime options",
    "SRC8.6": "TIDL J721E 08.06 algorithm source (ti_dl/algo/src: conv, inner product and "
              "batchNorm bias init; public in a processor-SDK mirror on GitHub)",
}

COARSE_CODES = 8
"""A channel scale whose code stays below this keeps 3 bits or fewer (>= 6 % rounding error):
what the doctor and the checker count for a standalone BatchNorm's per-tensor weights."""

DEPTHWISE_KERNELS = frozenset({((1, 3), 1), ((3, 3), 1), ((3, 3), 2), ((5, 5), 1), ((5, 5), 2),
                               ((7, 7), 1), ((7, 7), 2)})
"""(kernel, stride) of the depthwise convolutions TIDL runs [T11.2 operators.md]."""


@dataclass(frozen=True)
class DeviceProfile:
    """What one device (or the generic QDQ target) needs."""

    name: str
    description: str
    tidl: bool
    """A TIDL device (its options file and checker rules apply)."""
    scale_type: int
    """`advanced_options:quantization_scale_type`: 1 power-of-2 (TDA4VM), 4 asymmetric
    per-channel, of which symmetric power-of-2 is a special case (MMAv2 SoCs) [T11.2; BM]."""
    bias_bits: int
    """Width the engine keeps the biases of layers with 8-bit weights in: TDA4VM clips them to
    16 bit by default and then changes the weight scale to avoid clipping [BM; TR], so quantfx
    chooses the weight exponent that keeps the bias within int16 itself. Layers with 16-bit
    weights keep 32-bit biases (`bias_bits_for`)."""
    per_channel_depthwise: bool
    """Default of `QuantConfig.per_channel_depthwise`: TDA4VM (MMAv1) is per-tensor power-of-2
    only [MO]; MMAv2 SoCs take per-channel weights [T11.2]."""
    per_channel_weights: bool
    """Whether per-channel weight scales are accepted at all."""
    per_channel_convs: bool = False
    """Default of `QuantConfig.per_channel_weights` (every conv per output channel): on for the
    MMAv2 SoCs, which take per-channel weights for Conv [T11.2 quantization.md]."""
    default_opset: int = 18
    """TI's exporters write opset 17/18 (MO v2: 17, v3: 18); 11.0 validated up to 19, 11.2 21."""
    int16_qdq_importable: bool = False
    """Pre-quantized import is documented as 8-bit only [T11.0] (11.2 silent): int16 Q/DQ may
    be refused or re-quantized; 16-bit layers are named in the options' 16-bit lists."""
    tidl_tools_version: str = "11.2"
    """The edgeai-tidl-tools documentation the profile's rules follow."""
    no_3x3_stride_3: bool = False
    """AM62A/AM67A: no 3x3 stride-3 convolution [T11.2]."""
    conv_transpose_16bit: bool = True
    """AM62A/AM67A: no 16-bit ConvTranspose [T11.2]."""
    lut_activations: bool = True
    """LUT-accelerated Sigmoid/HardSigmoid/GELU/Tanh/Softmax/ELU (not on AM62A [T11.0])."""
    signed_unsigned_matmul: bool = True
    """MatMul of a signed and an unsigned input (not on TDA4VM [T11.2])."""

    def bias_bits_for(self, weight_bits: int) -> int:
        """The bias width of a layer with `weight_bits`-wide weights: the 16-bit bias of the
        8-bit flow applies only to 8-bit weights; TIDL keeps the biases of layers with wider
        weights in 32 bit [SRC8.6: `weightsElementSizeInBits <= 8` selects the int16 bias]."""
        return self.bias_bits if weight_bits <= 8 else 32


PROFILES: dict[str, DeviceProfile] = {
    "generic": DeviceProfile(
        "generic", "any runtime that executes QDQ ONNX (ONNX Runtime); TIDL's general rules",
        tidl=False, scale_type=1, bias_bits=32, per_channel_depthwise=True,
        per_channel_weights=True, int16_qdq_importable=True),
    "tda4vm": DeviceProfile(
        "tda4vm", "TI TDA4VM / J721E (C7x + MMAv1): power-of-2, per-tensor, 16-bit bias",
        tidl=True, scale_type=1, bias_bits=16, per_channel_depthwise=False,
        per_channel_weights=False, signed_unsigned_matmul=False),
    "am62a": DeviceProfile(
        "am62a", "TI AM62A (C7x + MMAv2, no LUT activations)", tidl=True, scale_type=4,
        bias_bits=32, per_channel_depthwise=True, per_channel_weights=True,
        per_channel_convs=True, no_3x3_stride_3=True, conv_transpose_16bit=False,
        lut_activations=False),
    "am67a": DeviceProfile(
        "am67a", "TI AM67A / J722S (C7x + MMAv2)", tidl=True, scale_type=4, bias_bits=32,
        per_channel_depthwise=True, per_channel_weights=True, per_channel_convs=True,
        no_3x3_stride_3=True, conv_transpose_16bit=False),
    "am68a": DeviceProfile(
        "am68a", "TI AM68A / J721S2 (C7x + MMAv2)", tidl=True, scale_type=4, bias_bits=32,
        per_channel_depthwise=True, per_channel_weights=True, per_channel_convs=True),
    "am69a": DeviceProfile(
        "am69a", "TI AM69A / J784S4 (4x C7x + MMAv2)", tidl=True, scale_type=4, bias_bits=32,
        per_channel_depthwise=True, per_channel_weights=True, per_channel_convs=True),
}
TARGETS = tuple(PROFILES)
TARGET_ALIASES = {"j721e": "tda4vm", "j722s": "am67a", "j721s2": "am68a", "tda4al": "am68a",
                  "tda4ve": "am68a", "j784s4": "am69a", "tda4vh": "am69a"}
"""TI's other names of the same SoCs (the Jacinto part numbers the SDKs use) -> the target."""


def resolve_target(name: object) -> object:
    """`name` as a target: case-insensitive, TI's Jacinto names accepted (anything that is not
    a string comes back unchanged, for the caller's type check)."""
    if not isinstance(name, str):
        return name
    lowered = name.strip().lower()
    return TARGET_ALIASES.get(lowered, lowered)

NO_QDQ_OPS = frozenset({"Split", "Slice", "Flatten", "Pad", "Squeeze", "Reshape", "Transpose"})
"""Ops TIDL runs without Q/DQ around them ("Requires QDQ: No") [T11.2 quantization.md]."""
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
"""An activation after these carries the Q/DQ of both [T11.2]."""
FUSE_INTO_ACTIVATION = frozenset({"Conv", "ConvTranspose", "Add", "Mul", "Sub", "Div",
                                  "BatchNormalization"})
"""Ops whose output may skip Q/DQ when a following Relu/Clip carries it [T11.2]."""
ONLY_INSIDE_FUSIONS = frozenset({"Erf", "Identity", "Dropout"})
"""Ops TIDL runs only inside a fusion (GELU) [T11.2 operators.md]."""
SUPPORTED_OPS = frozenset({
    "Conv", "ConvTranspose", "AveragePool", "GlobalAveragePool", "MaxPool", "GlobalMaxPool",
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Gemm", "MatMul", "Softmax",
    "BatchNormalization", "Concat", "Slice", "Split", "Reshape", "Flatten", "Squeeze",
    "Unsqueeze", "Transpose", "Resize", "Upsample", "DepthToSpace", "SpaceToDepth", "Pad",
    "ArgMax", "ArgMin", "ReduceMin", "ReduceMax", "ReduceMean", "ReduceSum", "Gather", "TopK",
    "GridSample", "Relu", "PRelu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
    "Elu", "Mish", "Clip", "Exp", "Log", "Sqrt", "Pow", "Sin", "Cos", "LayerNormalization",
    "InstanceNormalization", "Cast", "Expand", "ScatterND", "ScatterElements", "DeformConv",
    "QuantizeLinear", "DequantizeLinear",
}) | ONLY_INSIDE_FUSIONS
"""The ONNX ops TIDL offloads (within their constraints); any other runs on the ARM cores
through ONNX Runtime [T11.2 operators.md]."""
