"""Quantizers and integer layers: QuantizeLinear/DequantizeLinear pairs (or legacy Clip ranges),
Conv / ConvTranspose / Gemm / MatMul on dequantized integer weights and int32 biases, and PRelu
on dequantized integer slopes."""

from __future__ import annotations

import numpy as np
import torch.fx as fx
from torch import Tensor, nn

from quantfx.errors import ExportError
from quantfx.export.builder import Builder
from quantfx.layers import BatchNormLayer, IntegerLayer, PReLULayer
from quantfx.ops import FUSABLE_ACTIVATIONS
from quantfx.passes.graph_utils import module_of
from quantfx.qmath import from_codes, is_power_of_two, scale_of, to_codes
from quantfx.quantizers import FrozenQuantizer

NUMPY_INT_TYPES = {(8, True): np.int8, (8, False): np.uint8, (16, True): np.int16,
                   (16, False): np.uint16}
"""(bits, signed) of an activation quantizer -> the integer type of its Q/DQ zero point."""
NUMPY_CODE_TYPES = {8: np.int8, 16: np.int16, 32: np.int32}
"""Bits of a weight (8/16) or bias (32) -> the type of its integer initializer."""


def _qdq_pair(b: Builder, prefix: str, source: str, output: str,
              quantizer: FrozenQuantizer) -> None:
    """QuantizeLinear -> DequantizeLinear on `quantizer`'s grid, named after `prefix`."""
    dtype = NUMPY_INT_TYPES[(quantizer.bits, quantizer.signed)]
    scale_name = b.float_constant(f"{prefix}.scale", quantizer.scale)
    zero_name = b.constant(f"{prefix}.zero_point", np.zeros((), dtype=dtype))
    quantized = f"{prefix}.{np.dtype(dtype).name}"
    b.add("QuantizeLinear", [source, scale_name, zero_name], [quantized], f"{prefix}.quantize")
    b.add("DequantizeLinear", [quantized, scale_name, zero_name], [output],
          f"{prefix}.dequantize")


def _check_scale(node: fx.Node, quantizer: FrozenQuantizer) -> None:
    if not is_power_of_two(quantizer.scale):
        raise ExportError(f"quantizer '{node.target}' has scale {quantizer.scale!r}, not a "
                          "power of two.")


def emit_quantize(b: Builder, node: fx.Node, quantizer: FrozenQuantizer) -> None:
    source = b.tensor_input(node)
    if node in b.quantized_by_producer:
        b.env[node] = source
        return
    _check_scale(node, quantizer)
    scale = quantizer.scale
    if b.legacy:
        b.clip(node.name, source, node.name, quantizer.qmin * scale, quantizer.qmax * scale)
    else:
        _qdq_pair(b, node.name, source, node.name, quantizer)
    b.env[node] = node.name


def requantize(b: Builder, name: str, quantizer: FrozenQuantizer) -> str:
    """Q/DQ on the grid `name` already lies on (an exact identity): for a grid-keeping op TIDL
    wants Q/DQ after (MaxPool, Concat, Tile, ...). Returns the dequantized tensor's name."""
    output = f"{name}.requantized"
    _qdq_pair(b, f"{name}.requantize", name, output, quantizer)
    return output


def _dequantized_constant(b: Builder, name: str, codes: Tensor, exponent: Tensor,
                          bits: int, grid_values: Tensor) -> str:
    """A weight or bias: integer initializer + DequantizeLinear (QDQ), or float grid values."""
    if b.legacy:
        return b.constant(name, grid_values.detach().cpu().numpy().astype(np.float32))
    dtype = NUMPY_CODE_TYPES[bits]
    scale = scale_of(exponent).detach().cpu().numpy().astype(np.float32)
    per_channel = exponent.dim() > 0
    scale_name = b.constant(f"{name}_scale", scale if per_channel else scale.reshape(()))
    zero_name = b.constant(f"{name}_zero_point", np.zeros(scale.shape if per_channel else (),
                                                          dtype=dtype))
    codes_name = b.constant(f"{name}_quantized", codes.detach().cpu().numpy().astype(dtype))
    attributes = {"axis": 0} if per_channel else {}
    b.add("DequantizeLinear", [codes_name, scale_name, zero_name], [name], f"{name}.dequantize",
          **attributes)
    return name


def _layer_parameters(b: Builder, node: fx.Node, integer: IntegerLayer,
                      weight_shape: tuple[int, ...] | None = None) -> tuple[str, str | None]:
    """The layer's weight (reshaped to `weight_shape` if given) and bias as initializers."""
    layer = integer.layer
    weight_codes, weight_grid = integer.weight_int, layer.weight
    if weight_shape is not None:
        weight_codes, weight_grid = (weight_codes.reshape(weight_shape),
                                     weight_grid.reshape(weight_shape))
    weight = _dequantized_constant(b, f"{node.name}.weight", weight_codes,
                                   integer.weight_exponent, integer.weight_bits, weight_grid)
    bias = None
    if integer.bias_int is not None:
        bias = _dequantized_constant(b, f"{node.name}.bias", integer.bias_int,
                                     integer.bias_exponent, 32, layer.bias)
    return weight, bias


def conv_pads(layer: nn.modules.conv._ConvNd) -> list[int]:
    """ONNX `pads` (begins, then ends) of a conv, "same" padding included."""
    rank = len(layer.kernel_size)
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return [0] * (2 * rank)
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        begins = [total // 2 for total in totals]
        return begins + [total - begin for total, begin in zip(totals, begins)]
    return list(layer.padding) * 2


def _emit_linear(b: Builder, node: fx.Node, integer: IntegerLayer, source: str) -> None:
    """Gemm; a Linear on (..., features) runs as Reshape -> 2-D Gemm -> Reshape, so the layer
    is one node (TIDL's inner product) with no float tensor between its product and bias, and
    the output's Q/DQ sits on the Gemm, before the Reshape (no float tensor after it either)."""
    weight, bias = _layer_parameters(b, node, integer)
    in_shape = b.input_info(node).shape
    activation_grid = _activation_grid(b, node)
    if len(in_shape) == 2:
        b.emit(node, "Gemm", [source, weight] + ([bias] if bias else []), transB=1)
        if activation_grid:  # the Gemm keeps the layer's name (TIDL's 16-bit lists use it)
            b.env[node] = requantize(b, node.name, activation_grid)
        return
    rows = int(np.prod(in_shape[:-1]))
    b.reshape(f"{node.name}.rows", source, f"{node.name}.rows", (rows, in_shape[-1]))
    product = f"{node.name}.gemm"
    b.op("Gemm", [f"{node.name}.rows", weight] + ([bias] if bias else []), product, transB=1)
    if activation_grid:
        product = requantize(b, product, activation_grid)
    _reshaped_back(b, node, product, "rows", quantize=activation_grid is None)


def _reshaped_back(b: Builder, node: fx.Node, output: str, suffix: str,
                   quantize: bool = True) -> None:
    """`output` (the layer's values computed in another shape) reshaped back under the layer's
    name; with `quantize`, the one quantizer after the layer puts its Q/DQ on `output` first,
    so no float tensor follows the reshape."""
    users = list(node.users)
    quantizer = module_of(b.module, users[0]) if len(users) == 1 else None
    if quantize and isinstance(quantizer, FrozenQuantizer) and not b.legacy:
        _check_scale(users[0], quantizer)
        _qdq_pair(b, users[0].name, output, f"{users[0].name}.{suffix}", quantizer)
        output = f"{users[0].name}.{suffix}"
        b.quantized_by_producer.add(users[0])
    b.reshape(node.name, output, node.name, b.info(node).shape)
    b.env[node] = node.name


def _activation_grid(b: Builder, node: fx.Node) -> FrozenQuantizer | None:
    """The quantizer after the activation fused into linear `node` (ReLU, ReLU6, Hardtanh),
    if any: TIDL lets a Relu/Clip carry the Q/DQ of the op before it only for convs,
    BatchNorm and eltwise ops, so a Gemm's output gets Q/DQ on that same grid first (exact:
    the clamp commutes with rounding onto a grid that holds its bounds)."""
    users = list(node.users)
    if b.legacy or len(users) != 1 or not isinstance(module_of(b.module, users[0]),
                                                     FUSABLE_ACTIVATIONS):
        return None
    after = list(users[0].users)
    quantizer = module_of(b.module, after[0]) if len(after) == 1 else None
    return quantizer if isinstance(quantizer, FrozenQuantizer) else None


def _emit_batchnorm_layer(b: Builder, node: fx.Node, integer: IntegerLayer, source: str) -> None:
    """A `BatchNormLayer` as BatchNormalization with its quantized scale and int32 shift, mean
    0, variance 1 and epsilon 0: x * scale + shift, exact in float like the conv it is. TIDL
    runs BatchNormalization on 4-D (NCHW) inputs only (TI's model optimizer reshapes the
    others), so another rank runs as Reshape -> BatchNormalization (-> Q/DQ) -> Reshape."""
    layer = integer.layer
    channels = layer.out_channels
    scale = _dequantized_constant(b, f"{node.name}.scale", integer.weight_int.reshape(channels),
                                  integer.weight_exponent, integer.weight_bits,
                                  layer.weight.reshape(channels))
    shift = _dequantized_constant(b, f"{node.name}.shift", integer.bias_int,
                                  integer.bias_exponent, 32, layer.bias)
    mean = b.constant(f"{node.name}.mean", np.zeros(channels, dtype=np.float32))
    variance = b.constant(f"{node.name}.variance", np.ones(channels, dtype=np.float32))
    shape = b.input_info(node).shape
    if len(shape) == 4:
        b.emit(node, "BatchNormalization", [source, scale, shift, mean, variance], epsilon=0.0)
        return
    rest = list(shape[2:]) + [1] * (2 - len(shape[2:]))
    b.reshape(f"{node.name}.nchw", source, f"{node.name}.nchw",
              (shape[0], shape[1], int(np.prod(rest[:-1])), rest[-1]))
    output = b.op("BatchNormalization", [f"{node.name}.nchw", scale, shift, mean, variance],
                  f"{node.name}.affine", epsilon=0.0)
    _reshaped_back(b, node, output, "nchw")


TIDL_CONV_STRIDES = ((1, 1), (2, 2))
"""Strides TIDL runs for any kernel up to 7x7 (stride 4 only with an 11x11 kernel)."""


def patchifies(layer: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether a 2-D conv cuts its input into non-overlapping patches (kernel = stride, no
    padding, dilation 1, one group) at a stride TIDL does not run (a ViT/Swin/ConvNeXt patch
    embedding: 4x4 or 16x16 at stride 4 or 16), on an input whose height and width it tiles."""
    if (not isinstance(layer, nn.Conv2d) or layer.transposed or layer.groups != 1
            or tuple(layer.kernel_size) != tuple(layer.stride)
            or tuple(layer.stride) in TIDL_CONV_STRIDES or any(d != 1 for d in layer.dilation)
            or any(conv_pads(layer)) or len(input_shape) != 4):
        return False
    return input_shape[2] % layer.stride[0] == 0 and input_shape[3] % layer.stride[1] == 0


def _emit_patchify_conv(b: Builder, node: fx.Node, integer: IntegerLayer, source: str) -> None:
    """A patch-embedding conv as Reshape -> Transpose -> Reshape (space to depth: each patch
    becomes one position's channels, in the weight's (channel, row, column) order) and a 1x1
    Conv: the same sums, with only data movement before a conv every TIDL device runs."""
    batch, channels, height, width = b.input_info(node).shape
    rows, columns = integer.layer.stride
    name = node.name
    b.reshape(f"{name}.patches", source, f"{name}.patches",
              (batch, channels, height // rows, rows, width // columns, columns))
    b.op("Transpose", [f"{name}.patches"], f"{name}.patches_first", perm=[0, 1, 3, 5, 2, 4])
    b.reshape(f"{name}.space_to_depth", f"{name}.patches_first", f"{name}.space_to_depth",
              (batch, channels * rows * columns, height // rows, width // columns))
    weight, bias = _layer_parameters(b, node, integer,
                                     (integer.layer.out_channels, channels * rows * columns, 1, 1))
    b.emit(node, "Conv", [f"{name}.space_to_depth", weight] + ([bias] if bias else []),
           kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)


def emit_integer_layer(b: Builder, node: fx.Node, integer: IntegerLayer) -> None:
    layer = integer.layer
    source = b.tensor_input(node)
    if isinstance(layer, nn.Linear):
        _emit_linear(b, node, integer, source)
        return
    if isinstance(layer, BatchNormLayer):
        _emit_batchnorm_layer(b, node, integer, source)
        return
    if not isinstance(layer, nn.modules.conv._ConvNd):
        raise ExportError(f"layer '{node.target}' ({type(layer).__name__}) has no ONNX emitter.")
    if layer.padding_mode != "zeros":
        raise ExportError(
            f"conv '{node.target}' uses padding_mode='{layer.padding_mode}'; TIDL and this "
            "exporter support zero padding only. Pad explicitly (F.pad) or use "
            "padding_mode='zeros'."
        )
    if patchifies(layer, b.input_info(node).shape):
        _emit_patchify_conv(b, node, integer, source)
        return
    weight, bias = _layer_parameters(b, node, integer)
    extra = {"output_padding": list(layer.output_padding)} if layer.transposed else {}
    b.emit(node, "ConvTranspose" if layer.transposed else "Conv",
           [source, weight] + ([bias] if bias else []), kernel_shape=list(layer.kernel_size),
           strides=list(layer.stride), pads=conv_pads(layer), dilations=list(layer.dilation),
           group=layer.groups, **extra)


def emit_prelu_layer(b: Builder, node: fx.Node, prelu: PReLULayer) -> None:
    """PRelu whose slopes are integer codes + DequantizeLinear at their per-tensor scale (TIDL
    reads them as it quantizes PReLU), shaped to broadcast along the channel axis (dim 1)."""
    quantizer = prelu.weight_quantizer
    codes = to_codes(prelu.weight.detach(), quantizer.exponent, quantizer.qmin, quantizer.qmax)
    rank = len(b.input_info(node).shape)
    if codes.numel() > 1:
        codes = codes.reshape((codes.numel(),) + (1,) * max(rank - 2, 0))
    slope = _dequantized_constant(b, f"{node.name}.slope", codes, quantizer.exponent,
                                  quantizer.bits, from_codes(codes, quantizer.exponent))
    b.emit(node, "PRelu", [b.tensor_input(node), slope])
