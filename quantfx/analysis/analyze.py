"""`analyze`: "which layer loses the accuracy?" in one call. On real data: each quantized
tensor's SQNR against float in the quantized model, and what its own rounding (and its layer's
weight rounding) costs alone, from one float and one quantized pass per batch; end to end
weights-only / activations-only / 8 / 16 bit; and the fewest layers to keep at 16 bit to reach
a target, as `QuantConfig(sixteen_bit_layers=...)` takes them."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantfx.analysis.sensitivity import (
    Sums,
    TensorSensitivity,
    quantizer_nodes,
    tensor_statistics,
)
from quantfx.checks import check_number
from quantfx.config import QuantConfig, resolve_config
from quantfx.convert import convert
from quantfx.errors import ConfigError, ConvertError
from quantfx.layers import FakeQuantLayer, PReLULayer
from quantfx.passes.graph_utils import flatten_values
from quantfx.ptc import calibrate, prepare
from quantfx.ptc.calibration_check import unlogged_calibrations
from quantfx.ptc.learned_rounding import float_parameters
from quantfx.quantizers import set_quant_mode
from quantfx.ranks import this_process_only
from quantfx.state import FLOAT, require_state, state_of

MAX_BATCHES = 8
"""Batches of `data` the per-tensor statistics use (the suggestion's trials use them too)."""
MOST_OF_THE_MODEL = 0.5  # a suggestion above this share of the tensors comes with `_advice`


@dataclass
class AnalysisReport:
    """What `analyze` measured; `sixteen_bit_layers` is the suggestion."""

    output_sqnr_db: dict[str, float] = field(default_factory=dict)
    """Model output against float: "int8", "weights only", "activations only", "int16",
    "suggested" (int8 with `sixteen_bit_layers` at 16 bit). "weights only" and "activations
    only" run on the float weights and biases: calibration's corrections fit the whole
    quantized model, not half of it."""
    tensors: list[TensorSensitivity] = field(default_factory=list)
    """Every quantized tensor, the one whose own rounding costs most first."""
    sixteen_bit_layers: list[str] = field(default_factory=list)
    target: float | None = None
    reached: bool = True
    """Whether the suggestion reaches `target` (False: even every tensor at 16 bit falls short,
    the suggestion is then all of them)."""
    scores: dict[str, float] = field(default_factory=dict)
    """`evaluate` of the float, int8, int16 and suggested models, when given."""
    advice: str = ""
    """What to try before the suggestion when it keeps most of the model at 16 bit."""
    analyzed_with: QuantConfig | None = None
    """The config `analyze` measured with (in the JSON as its fields; `config()` starts
    from it)."""

    def config(self, base: QuantConfig | None = None) -> QuantConfig:
        """`base` (default: the config `analyze` measured with) with the suggested 16-bit
        layers added to the ones it keeps, and to those `analyze` measured with: the
        suggestion holds for the target and options it was measured under."""
        if base is not None and not isinstance(base, QuantConfig):
            raise ConfigError(f"base must be a quantfx.QuantConfig or None, got "
                              f"{type(base).__name__}.")
        measured_with = self.analyzed_with or QuantConfig()
        base = measured_with if base is None else base
        layers = (*base.sixteen_bit_layers, *measured_with.sixteen_bit_layers,
                  *self.sixteen_bit_layers)
        return replace(base, sixteen_bit_layers=tuple(dict.fromkeys(layers)))

    def __str__(self) -> str:
        lines = ["output SQNR against float: " + ", ".join(
            f"{name} {value:.1f} dB" for name, value in self.output_sqnr_db.items())]
        if self.scores:
            lines.append("scores: " + ", ".join(f"{k} {v:.4g}" for k, v in self.scores.items()))
        verdict = "reaches" if self.reached else "does NOT reach (even all at 16 bit)"
        target = f"{self.target:.4g}" if self.target is not None else "none"
        lines.append(f"keep at 16 bit ({len(self.sixteen_bit_layers)}): "
                     f"{', '.join(self.sixteen_bit_layers) or 'nothing'}; {verdict} the target "
                     f"{target}{'' if self.scores else ' dB'}")
        if self.advice:
            lines.append(self.advice)
        lines.append("worst tensors (own rounding / in the quantized model):")
        lines += [f"  {t.tensor:<40} {t.alone_db:6.1f} dB / {t.sqnr_in_model_db:6.1f} dB"
                  for t in self.tensors[:10]]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        rows = ["| tensor | layer | bits | own rounding dB | weights alone dB | in model dB |",
                "|---|---|---|---|---|---|"]
        rows += [f"| {t.tensor} | {t.layer or ''} | {t.bits} | {t.activation_alone_db:.1f} | "
                 f"{'' if t.weight_alone_db is None else f'{t.weight_alone_db:.1f}'} | "
                 f"{t.sqnr_in_model_db:.1f} |" for t in self.tensors]
        text = str(self).split("\nworst tensors", 1)[0]
        summary = "\n".join(f"- {line}" for line in text.splitlines())
        return f"# analyze\n\n{summary}\n\n" + "\n".join(rows) + "\n"

    def to_json(self) -> str:
        """Valid JSON: an infinite SQNR (no error at all) is written as null, not Infinity."""
        data = _finite({key: value for key, value in asdict(self).items()
                        if key != "analyzed_with"})
        if self.analyzed_with is not None:  # what the suggestion is relative to
            data["analyzed_with"] = _finite(asdict(self.analyzed_with))
        return json.dumps(data, indent=2, default=lambda value: None, allow_nan=False)

    def save(self, folder: str) -> list[str]:
        """Write report.md, report.html (self-contained) and report.json into `folder` and,
        with matplotlib (`pip install quantfx[plot]`), sqnr.png (per-tensor SQNR) and
        ranges.png (log-scale value histograms of the worst tensors); returns the paths."""
        from quantfx.analysis.plots import write_report

        return write_report(self, folder)


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _run(model: nn.Module, batches: list[tuple[Tensor, ...]]) -> list[Tensor]:
    with torch.no_grad():
        return [torch.cat([t.flatten() for t in flatten_values(model(*batch))
                           if isinstance(t, Tensor)]) for batch in batches]


def _output_sqnr(reference: list[Tensor], outputs: list[Tensor]) -> float:
    sums = Sums()
    for want, got in zip(reference, outputs):
        sums.add("out", want, got)
    return sums.sqnr("out")


def _quantize(model: nn.Module, example: Any, config: QuantConfig,
              batches: list[tuple[Tensor, ...]], bar: tqdm) -> tuple[fx.GraphModule, ...]:
    """One calibration (its own bars off: `bar` counts analyze's calibrations)."""
    prepared = prepare(model, example, replace(config, progress=False))
    with unlogged_calibrations():
        calibrate(prepared, batches)
    bar.update(1)
    return prepared, convert(prepared)


def _partial(prepared: fx.GraphModule, weights: bool, activations: bool,
             batches: list[tuple[Tensor, ...]]) -> list[Tensor]:
    """Outputs of the prepared model with only weights (or only activations) quantized."""
    for module in prepared.modules():
        if isinstance(module, (FakeQuantLayer, PReLULayer)):
            module.weight_quantizer.set_mode(observe=False, quantize=weights)
    for name in quantizer_nodes(prepared):
        prepared.get_submodule(name).set_mode(observe=False, quantize=activations)
    try:
        return _run(prepared, batches)
    finally:
        set_quant_mode(prepared, observe=True, quantize=False)


def _suggest(model: nn.Module, example: Any, config: QuantConfig, candidates: list[str],
             batches: list[tuple[Tensor, ...]], good_enough: Callable[[nn.Module], bool],
             bar: tqdm) -> tuple[list[str], nn.Module, bool]:
    """The shortest prefix of `candidates` (worst first) that makes the model good enough,
    found by bisection: log2(len) calibrations, not one per layer; and whether it is."""
    low, high = 0, len(candidates)
    bar.total += 1 + math.ceil(math.log2(len(candidates) + 1))
    bar.refresh()
    _, converted = _quantize(model, example, replace(config, sixteen_bit_layers=tuple(
        candidates)), batches, bar)
    if not good_enough(converted):
        return candidates, converted, False  # even all of them does not reach the target
    best = (candidates, converted)
    while low < high:
        middle = (low + high) // 2
        chosen = candidates[:middle]
        _, trial = _quantize(model, example, replace(config, sixteen_bit_layers=tuple(chosen)),
                             batches, bar)
        if good_enough(trial):
            best, high = (chosen, trial), middle
        else:
            low = middle + 1
    return best[0], best[1], True


def analyze(model: nn.Module, example_inputs: Any, data: Iterable,
            evaluate: Callable[[nn.Module], float] | None = None,
            config: QuantConfig | None = None, target: float | None = None) -> AnalysisReport:
    """Per-tensor sensitivity of `model` on `data`, and the 16-bit layers that reach `target`.

    `data` is calibration data as `calibrate` takes it; its first `MAX_BATCHES` batches are
    measured. `target` is an output SQNR in dB (default: 6 dB above the 8-bit model's, i.e.
    a quarter of its noise power, and no more than 3 dB below the all-16-bit model's) or, with
    `evaluate(model) -> score` (higher is better), a score (default: the float score minus 1).
    The suggestion is the fewest worst-first layers that reach it.
    """
    given, config = config, resolve_config(config)
    batches = _checked_batches(model, data, evaluate, target)
    with this_process_only(), tqdm(total=2, desc="analyze", unit="calibration", leave=False,
                                   disable=None if config.progress else True) as bar:
        report = _analyze(model, example_inputs, batches, evaluate, config, target, bar)
        bar.total = bar.n  # the bisection may stop early: end the bar full
    report.analyzed_with = given or QuantConfig()
    return report


def _analyze(model: nn.Module, example_inputs: Any, batches: list[tuple[Tensor, ...]],
             evaluate: Callable[[nn.Module], float] | None, config: QuantConfig,
             target: float | None, bar: tqdm) -> AnalysisReport:
    """`analyze` once its arguments are checked; `bar` counts its calibrations."""
    prepared, converted = _quantize(model, example_inputs, config, batches, bar)
    count = len(state_of(prepared).input_shapes) or None  # a partly quantized model: all
    inputs = [batch[:count] for batch in batches]
    was_training = model.training
    model.eval()
    try:
        reference = _run(model, inputs)
    finally:
        model.train(was_training)
    report = AnalysisReport()
    report.tensors = tensor_statistics(prepared, converted, inputs)
    report.output_sqnr_db["int8"] = _output_sqnr(reference, _run(converted, inputs))
    with float_parameters(prepared):  # not the corrections, fitted to quantized inputs
        weights_only = _partial(prepared, True, False, inputs)
        only = _partial(prepared, False, True, inputs)
    report.output_sqnr_db["weights only"] = _output_sqnr(reference, weights_only)
    report.output_sqnr_db["activations only"] = _output_sqnr(reference, only)
    wide = replace(config, activation_bits=16, weight_bits=16, sixteen_bit_layers=())
    _, sixteen = _quantize(model, example_inputs, wide, batches, bar)
    report.output_sqnr_db["int16"] = _output_sqnr(reference, _run(sixteen, inputs))
    # a layer's name widens its weights too; other tensors (adds, inputs, ...) by node name
    candidates = list(dict.fromkeys(t.layer or t.tensor for t in report.tensors))
    if evaluate is not None:
        report.scores = {"float": _score(evaluate, copy.deepcopy(model)), "int8": _score(
            evaluate, converted), "int16": _score(evaluate, sixteen)}
        report.target = report.scores["float"] - 1.0 if target is None else target
        good = lambda candidate: _score(evaluate, candidate) >= report.target  # noqa: E731
    else:
        report.target = min(report.output_sqnr_db["int8"] + 6.0,
                            report.output_sqnr_db["int16"] - 3.0) if target is None else target
        good = lambda candidate: _output_sqnr(  # noqa: E731
            reference, _run(candidate, inputs)) >= report.target
    if good(converted):
        report.sixteen_bit_layers, suggested = [], converted
    else:
        report.sixteen_bit_layers, suggested, report.reached = _suggest(
            model, example_inputs, config, candidates, batches, good, bar)
    report.output_sqnr_db["suggested"] = _output_sqnr(reference, _run(suggested, inputs))
    report.advice = _advice(len(report.sixteen_bit_layers), len(candidates))
    if evaluate is not None:
        report.scores["suggested"] = _score(evaluate, suggested)
    return report


def _advice(suggested: int, candidates: int) -> str:
    """When the suggestion is most of the model, the levers that keep it 8 bit."""
    return "" if suggested <= MOST_OF_THE_MODEL * candidates else (
        f"that is {suggested} of the model's {candidates} quantized tensors: nearly a 16-bit "
        "model in memory and speed. Try what keeps 8 bit first: per_channel_weights=True "
        "(AM6xA), weight_rounding='learned' or 'error_feedback', equalization=True, QAT "
        "(quantfx.prepare_qat), or a lower target.")


def _checked_batches(model: Any, data: Any, evaluate: Any, target: Any
                     ) -> list[tuple[Tensor, ...]]:
    """`analyze`'s arguments checked; the first `MAX_BATCHES` batches of `data` as tuples."""
    require_state(model, "analyze", ConfigError, (FLOAT,), "the float model (a torch.nn.Module)",
                  "analyze quantizes the float model itself: give it the model you gave "
                  "quantfx.prepare.")
    if evaluate is not None and not callable(evaluate):
        raise ConfigError("evaluate must be a callable taking a model and returning a score.")
    if target is not None:
        check_number(target, "target", example="35.0 (dB), or a score with evaluate")
    try:
        return [tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
                for _, batch in zip(range(MAX_BATCHES), data)]
    except TypeError as error:
        raise ConfigError(f"data must be an iterable of batches, got {type(data).__name__}."
                          ) from error


def _score(evaluate: Callable[[nn.Module], float], model: nn.Module) -> float:
    """The user's score of `model` (a copy of the float model, or a converted one), in eval
    mode: an `evaluate` that calls `model.train()` must not touch the user's BatchNorms."""
    try:
        score = evaluate(model.eval())
    except ConvertError as error:
        raise ConfigError(f"evaluate(model) failed on a quantized model ({error}); evaluate "
                          "must only run the model: analyze sets eval mode.") from error
    if isinstance(score, Tensor) and score.numel() == 1:
        score = score.item()
    return check_number(score, "evaluate(model)", example="top-1 accuracy in %")
