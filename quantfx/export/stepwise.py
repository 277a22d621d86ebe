"""Step-by-step verification: each quantized tensor of the file against the converted model
given the *same* quantized inputs.

End to end, a file whose float32 sums are not exact (a 16-bit activation times 8- or 16-bit
weights passes 2**24; LayerNorm, Softmax) can differ from PyTorch by more than 1 LSB: ONNX
Runtime's reference kernels and PyTorch's round the same sum differently, the next quantizer
turns a rounding into a 1-LSB flip, and every layer after it inherits the flip. Neither is the
device's arithmetic (TIDL accumulates in integers). What the file must get right is each step:
every quantized tensor, computed from the file's own quantized inputs, must equal what the
converted model computes from those inputs, to within 1 LSB (a float32 rounding that lands on
the other side of a rounding boundary) on all but a few of its elements. This module checks
that in one ONNX Runtime run (every quantized tensor exposed as an output) and one PyTorch pass
that takes ONNX Runtime's value at each quantizer (teacher forcing), so a difference never
propagates and the wrong step is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import helper
from torch import Tensor

from quantfx.export.verify import onnxruntime_session
from quantfx.passes.graph_utils import module_of
from quantfx.quantizers import FrozenQuantizer

STEP_TOLERANCE_LSB = 1.0
"""Allowed difference of one quantized tensor computed from identical quantized inputs: one
float32 rounding on the other side of a rounding boundary."""
STEP_DIFFERING_SHARE = 0.1
"""Largest share of one step's elements allowed to differ (by that 1 LSB). Float32 roundings
across a boundary are rare (at most 0.4 % of a step's elements on resnet18 with most layers
at 16 bit and on EfficientNet-Lite1's measured mixed precision); a step on a grid twice as
coarse as the model's is also within 1 LSB everywhere, but differs on a quarter of its
elements."""


@dataclass
class StepwiseFigures:
    """How the file's quantized tensors agree with the model's, step by step."""

    steps: int
    """Quantized tensors compared (per batch)."""
    fraction_identical: float
    """Share of their elements that are bit-identical."""
    max_lsb_diff: float
    """Largest difference of one step, in LSBs of its quantizer's scale."""
    max_differing_share: float
    """Largest share of one step's elements that differ (on one batch)."""
    worst_step: str
    """The FX node name of the step that differs most, by LSBs and then by share ("" when
    nothing differs)."""

    @property
    def within_tolerance(self) -> bool:
        return (self.max_lsb_diff <= STEP_TOLERANCE_LSB
                and self.max_differing_share <= STEP_DIFFERING_SHARE)


class _Forced(fx.Interpreter):
    """Runs the converted model, checking each quantizer's output against ONNX Runtime's and
    continuing from ONNX Runtime's value."""

    def __init__(self, module: fx.GraphModule, theirs: dict[fx.Node, np.ndarray],
                 figures: dict[str, Any]) -> None:
        super().__init__(module)
        self.theirs = theirs
        self.figures = figures

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        if node not in self.theirs or not isinstance(result, Tensor):
            return result
        theirs = torch.from_numpy(self.theirs[node]).to(result.dtype)
        ours = result.detach().cpu()
        if ours.shape != theirs.shape:
            self.figures.update(max=float("inf"), share=1.0, worst=node.name)
            return result
        scale = float(module_of(self.module, node).scale)
        difference = float((ours.double() - theirs.double()).abs().max()) / scale
        same = int(torch.count_nonzero(ours == theirs))
        self.figures["total"] += ours.numel()
        self.figures["identical"] += same
        share = 1 - same / max(ours.numel(), 1)
        if (difference, share) > (self.figures["max"], self.figures["share"]):
            self.figures["worst"] = node.name
        self.figures["max"] = max(self.figures["max"], difference)
        self.figures["share"] = max(self.figures["share"], share)
        return theirs.to(result.device)


def _checked_steps(model: fx.GraphModule, names: dict[fx.Node, Any]) -> dict[fx.Node, str]:
    """FX quantizer node -> the ONNX tensor that holds its (dequantized) value."""
    return {node: names[node] for node in model.graph.nodes
            if isinstance(module_of(model, node), FrozenQuantizer)
            and isinstance(names.get(node), str)}


def _exposing(onnx_model: onnx.ModelProto, tensors: list[str]) -> bytes:
    """The serialized model with `tensors` added to its outputs (the file is not changed)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(onnx_model)
    present = {value.name for value in exposed.graph.output}
    inferred = {value.name: value for value in exposed.graph.value_info}
    for name in tensors:
        if name not in present:
            exposed.graph.output.append(inferred.get(name) or helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
            present.add(name)
    return exposed.SerializeToString()


def verify_stepwise(model: fx.GraphModule, onnx_model: onnx.ModelProto,
                    names: dict[fx.Node, Any], batches: list[tuple[Tensor, ...]],
                    threads: int = 1) -> StepwiseFigures:
    """Compare every quantized tensor of `onnx_model` with converted `model` given the same
    quantized inputs, on `batches` (the module text says why)."""
    steps = _checked_steps(model, names)
    fixed = ({value.name for value in onnx_model.graph.input}
             | {tensor.name for tensor in onnx_model.graph.initializer})
    wanted = [name for name in dict.fromkeys(steps.values()) if name not in fixed]
    session = onnxruntime_session(_exposing(onnx_model, wanted), threads)
    input_names = [value.name for value in session.get_inputs()]
    figures: dict[str, Any] = {"total": 0, "identical": 0, "max": 0.0, "share": 0.0,
                               "worst": ""}
    for batch in batches:
        feed = {name: t.detach().cpu().numpy().astype(np.float32)
                for name, t in zip(input_names, batch)}
        values = dict(zip(wanted, session.run(wanted, feed)))
        values.update(feed)
        theirs = {node: values[name] for node, name in steps.items() if name in values}
        with torch.no_grad():
            _Forced(model, theirs, figures).run(*batch)
    total = figures["total"]
    return StepwiseFigures(len(steps), figures["identical"] / total if total else 1.0,
                           figures["max"], figures["share"], figures["worst"])
