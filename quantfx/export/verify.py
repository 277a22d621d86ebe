"""Verification in ONNX Runtime: run the written file and compare it with the converted model.

Also the one ONNX Runtime session helper of the project (the demo and the benchmarks use it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from quantfx.errors import ExportError
from quantfx.ops import FLOAT_ROUNDING_MODULES
from quantfx.passes.graph_utils import flatten_values, output_quantizers, set_submodule
from quantfx.quantizers import FrozenQuantizer, Quantizer

SIXTEEN_BIT_TOLERANCE_LSB = 32.0
"""Allowed difference on 16-bit outputs (1/8 of an 8-bit step): float32 sums of int16 x int16
products are not exact, so PyTorch and ONNX Runtime round them differently."""


def cpu_dot_product_extension() -> str | None:
    """The x86 integer dot-product extension of this CPU ("avx512_vnni", "avx_vnni"), or None:
    without one, ONNX Runtime's optimized u8s8 kernels saturate int16 pair sums."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return None
    return next((flag for flag in ("avx512_vnni", "avx_vnni") if flag in flags), None)


def onnxruntime_session(path: str | bytes, threads: int = 1, optimized: bool = False) -> Any:
    """An ONNX Runtime CPU session (of a file, or a serialized model); by default one that
    executes the file as written.

    Without `optimized`, graph optimizations are off: ORT would otherwise fuse DQ->Conv->Q into
    integer kernels (QLinearConv), and on CPUs without VNNI its u8s8 kernels may saturate int16
    intermediate sums. The float path that is left computes exactly what the ONNX operators
    define. `optimized=True` gives the deployment session (all optimizations, integer kernels).
    Intra-op spinning is off, so sessions timed side by side do not slow each other.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.use_deterministic_compute = True
    options.log_severity_level = 3  # errors only: ORT's optimizer notes are not for users
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimized:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def verification_batches(inputs: tuple[Tensor, ...], data: Any) -> list[tuple[Tensor, ...]]:
    """The example inputs, then `data` (a tensor, a tuple of tensors or an iterable of
    batches) cut into pieces of the exported (static) batch size."""
    count = len(inputs)
    if data is None:
        extra: list[tuple[Tensor, ...]] = []
    elif isinstance(data, Tensor):
        extra = [(data,)]
    elif isinstance(data, (tuple, list)) and data and len(data) == count and all(
            isinstance(t, Tensor) for t in data):
        extra = [tuple(data)]
    else:
        try:
            batches = list(data)
        except TypeError as error:
            raise ExportError(f"verify_data must be a tensor, a tuple of tensors or an iterable "
                              f"of batches, got {type(data).__name__}.") from error
        extra = []
        for index, item in enumerate(batches):
            items = (item,) if isinstance(item, Tensor) else item
            if not isinstance(items, (tuple, list)) or not all(
                    isinstance(t, Tensor) for t in items[:count]):
                raise ExportError(f"verify_data batch {index} is a {type(item).__name__}; give "
                                  "tensors, or tuples whose first items are the model's inputs.")
            extra.append(tuple(items)[:count])
    if data is not None and not extra:
        raise ExportError("verify_data holds no batch: give the data to verify on, or leave "
                          "verify_data out (the example inputs are always verified).")
    for index, batch in enumerate(extra):
        if not all(bool(torch.isfinite(t).all()) for t in batch if t.is_floating_point()):
            raise ExportError(f"verify_data batch {index} holds NaN or Inf values: agreement "
                              "on them says nothing. Verify on real inputs.")
    shapes = [tuple(t.shape) for t in inputs]
    batches = [inputs]
    for batch in extra:
        batches.extend(_split_to_export_batch(batch, shapes))
    return batches


def _split_to_export_batch(batch: tuple[Tensor, ...], shapes: list[tuple[int, ...]]
                           ) -> list[tuple[Tensor, ...]]:
    """Cut a verification batch into pieces of the exported (static) batch size."""
    if len(batch) != len(shapes):
        raise ExportError(f"verify_data batches need {len(shapes)} tensor(s), got {len(batch)}.")
    for tensor, shape in zip(batch, shapes):
        if tensor.dtype != torch.float32:
            raise ExportError(f"verify_data holds a {str(tensor.dtype).removeprefix('torch.')} "
                              "tensor; give the float32 tensors the model takes.")
        if tuple(tensor.shape[1:]) != shape[1:] or tensor.shape[0] % shape[0]:
            raise ExportError(
                f"verify_data tensor of shape {tuple(tensor.shape)} does not fit the exported "
                f"static shape {shape}: keep the non-batch dims and use a multiple of the batch "
                f"size {shape[0]}."
            )
    pieces = batch[0].shape[0] // shapes[0][0]
    return [tuple(t.detach().cpu().split(shape[0])[index] for t, shape in zip(batch, shapes))
            for index in range(pieces)]


def default_tolerance(quantizer: Quantizer | None) -> float:
    """Allowed output difference in LSBs: 1 for 8-bit outputs, `SIXTEEN_BIT_TOLERANCE_LSB` for
    16-bit ones (int16 x int16 products pass 2**24, so float32 accumulation rounds in both
    PyTorch and ONNX Runtime, each in its own summation order)."""
    if quantizer is not None and quantizer.bits == 16:
        return SIXTEEN_BIT_TOLERANCE_LSB
    return 1.0


def verify(model: fx.GraphModule, path: str, batches: list[tuple[Tensor, ...]],
           reference: Callable[..., Any] | None = None, threads: int = 1,
           max_lsb_diff: float | None = None, optimized: bool = False) -> dict[str, Any]:
    """Run `path` in ONNX Runtime on `batches` and compare with `reference` (default: `model`).

    Returns the fraction of bit-identical output elements, the largest difference in LSBs of
    each output's quantizer scale, whether every output is within its tolerance (`max_lsb_diff`,
    or `default_tolerance`) and, for 2-D outputs, the share of rows with the same argmax.
    `optimized` runs ORT with all graph optimizations (its integer QDQ kernels) instead.
    """
    session = onnxruntime_session(path, threads, optimized)
    input_names = [value.name for value in session.get_inputs()]
    batches = [(batch,) if isinstance(batch, Tensor) else tuple(batch) for batch in batches]
    for batch in batches:
        shapes = [tuple(t.shape) for t in batch]
        wanted = [tuple(value.shape) for value in session.get_inputs()]
        if shapes != wanted:
            raise ExportError(f"verify: a batch has shape(s) {shapes} but the file takes "
                              f"{wanted} (its static shapes).")
    quantizers = output_quantizers(model)
    scales = [q.scale if q is not None else None for q in quantizers]
    allowed = [max_lsb_diff if max_lsb_diff is not None else default_tolerance(q)
               for q in quantizers]
    reference = reference or model
    device = next(iter(model.parameters()), torch.empty(0)).device
    total = identical = 0
    max_lsb = 0.0
    within = True
    rows = agreeing_rows = 0
    for batch in batches:
        with torch.no_grad():
            expected = flatten_values(reference(*(t.to(device) for t in batch)))
        feed = {name: t.detach().cpu().numpy().astype(np.float32)
                for name, t in zip(input_names, batch)}
        actual = session.run(None, feed)
        for want, got, scale, limit in zip(expected, actual, scales, allowed):
            want = want.detach().cpu().numpy().astype(np.float32)
            total += want.size
            identical += int(np.count_nonzero(want == got))
            difference = float(np.max(np.abs(want.astype(np.float64) - got))) if want.size else 0.0
            lsb = difference / scale if scale else difference
            max_lsb = max(max_lsb, lsb)
            within = within and lsb <= limit
            if want.ndim == 2:
                rows += want.shape[0]
                agreeing_rows += int(np.count_nonzero(want.argmax(1) == got.argmax(1)))
    return {
        "elements_compared": total,
        "fraction_identical": identical / total if total else 1.0,
        "max_lsb_diff": max_lsb,
        "within_tolerance": within,
        "allowed_lsb_diff": allowed,
        "argmax_agreement": agreeing_rows / rows if rows else None,
        "output_scales": scales,
    }


def clip_simulation(model: fx.GraphModule) -> nn.Module:
    """What the legacy float file computes: the converted model with every quantizer replaced
    by a clamp to its range (no rounding)."""
    clipped = copy.deepcopy(model)
    for name, module in list(clipped.named_modules()):
        if isinstance(module, FrozenQuantizer):
            set_submodule(clipped, name, nn.Hardtanh(module.qmin * module.scale,
                                                     module.qmax * module.scale))
    return clipped


def float_rounding_ops(model: nn.Module) -> str:
    """'LayerNorm x25, MultiheadAttention x12' for the float-rounding modules of `model`."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, FLOAT_ROUNDING_MODULES):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return ", ".join(f"{name} x{count}" for name, count in counts.items())


def disagreement(figures: dict[str, Any], model: nn.Module, legacy: bool,
                 stepwise: Any = None) -> ExportError:
    """The error to raise when the file's outputs are outside the allowed difference (and, if
    it was checked, a step differs too: `stepwise`, a `StepwiseFigures`)."""
    allowed = ", ".join(f"{limit:g}" for limit in figures["allowed_lsb_diff"])
    against = "its clip simulation" if legacy else "the converted model"
    float_ops = float_rounding_ops(model)
    if float_ops:
        advice = (
            f"The graph computes {float_ops} in float between quantizers: ONNX Runtime's "
            "float kernels round differently from PyTorch's, the next quantizer turns that "
            "into 1-LSB flips, and deep networks amplify them. Check the ONNX file's task "
            "accuracy instead: export with a larger max_lsb_diff or verify=False."
        )
    else:
        advice = "Please report this model to the quantfx developers."
    if stepwise is not None:
        advice = (f"Step by step (each quantized tensor from the file's own inputs) "
                  f"'{stepwise.worst_step}' differs most: up to {stepwise.max_lsb_diff:g} LSB "
                  f"on {100 * stepwise.max_differing_share:.1f}% of its elements (1 LSB on a "
                  f"few allowed). {advice}")
    return ExportError(
        f"ONNX Runtime's outputs differ from {against} by up to {figures['max_lsb_diff']:g} "
        f"LSB (allowed: {allowed}); {100 * figures['fraction_identical']:.3f}% of "
        f"{figures['elements_compared']} elements are identical. No file was written. {advice}"
    )
