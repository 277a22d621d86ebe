"""analyze: a damaged layer ranks first, and the suggested 16-bit layers reach the target."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

import quantfx as qf
from quantfx.state import state_of

CONFIG = qf.QuantConfig(progress=False, weight_observer="minmax", bias_calibration=False,
                        widen_coarse_weights=False, weight_rounding="nearest",
                        widen_sensitive_layers=False)  # the damaged layer stays 8 bit


class Chain(nn.Module):
    """Four conv+ReLU layers; `damaged` gets a weight 300x its others (a wasted scale)."""

    def __init__(self, damaged: str = "c2") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        with torch.no_grad():
            weight = getattr(self, damaged).weight
            weight[0, 0, 0, 0] = 300 * weight.abs().max()

    def forward(self, x):
        for conv in (self.c1, self.c2, self.c3):
            x = torch.relu(conv(x))
        return self.c4(x)


def _data(count: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 12, 12, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def report() -> qf.AnalysisReport:
    data = _data()
    return qf.analyze(Chain().eval(), data[0][:1], data, config=CONFIG)


def test_the_damaged_layer_ranks_first(report):
    worst = report.tensors[0]
    assert worst.layer == "c2" and worst.weight_alone_db is not None
    others = [t.weight_alone_db for t in report.tensors if t.layer not in ("c2", None)]
    assert worst.weight_alone_db < min(others) - 15


def test_float_figures_use_the_float_weights_after_weight_rounding_and_bias_calibration():
    """Error feedback and bias calibration change the prepared model's weights and biases:
    the float pass and "activations only" must run on the float ones (else a layer's weight
    error reads as none, an infinite SQNR)."""
    data = _data()
    config = replace(CONFIG, weight_rounding="error_feedback", bias_calibration=True)
    report = qf.analyze(Chain().eval(), data[0][:1], data, config=config)
    alone = [t.weight_alone_db for t in report.tensors if t.layer is not None]
    assert alone and all(value < 52.0 for value in alone)  # 8 bit: about 6 dB a bit at most
    assert report.tensors[0].layer == "c2"
    sqnr = report.output_sqnr_db
    assert sqnr["weights only"] < sqnr["activations only"] < sqnr["int16"]


def test_weights_only_is_the_float_weights_rounded_not_the_bias_corrections():
    """"weights only" ran with the biases bias calibration fitted to quantized activations,
    next to float activations (Swin V2 read 1.3 dB there against 17.5 for activations only):
    it is the same figure with and without bias calibration."""
    data = _data()
    figures = [qf.analyze(Chain().eval(), data[0][:1], data, config=replace(
        CONFIG, weight_rounding="nearest", bias_calibration=corrected)).output_sqnr_db
        for corrected in (True, False)]
    assert figures[0]["weights only"] == pytest.approx(figures[1]["weights only"], abs=1e-3)
    assert figures[0]["int8"] != pytest.approx(figures[1]["int8"], abs=1e-3)  # it corrected


def test_the_suggestion_reaches_its_target_with_few_layers(report):
    sqnr = report.output_sqnr_db
    assert sqnr["int8"] < report.target <= sqnr["int16"]
    assert sqnr["suggested"] >= report.target
    assert report.sixteen_bit_layers and report.sixteen_bit_layers[0] == "c2"
    assert len(report.sixteen_bit_layers) < 4
    config = report.config(CONFIG)  # in the form QuantConfig takes
    assert config.sixteen_bit_layers == tuple(report.sixteen_bit_layers)
    assert report.advice == "" and "nearly a 16-bit model" not in str(report)


def test_a_suggestion_of_most_of_the_model_names_the_levers_that_keep_8_bit():
    data = _data()
    demanding = qf.analyze(Chain().eval(), data[0][:1], data, config=CONFIG, target=80.0)
    assert len(demanding.sixteen_bit_layers) > len(demanding.tensors) / 2
    assert "nearly a 16-bit model" in str(demanding) and "per_channel_weights" in str(demanding)
    assert "nearly a 16-bit model" in demanding.to_markdown()
    assert json.loads(demanding.to_json())["advice"] == demanding.advice


def test_end_to_end_figures_are_ordered(report):
    sqnr = report.output_sqnr_db
    assert sqnr["int16"] > sqnr["int8"] and sqnr["weights only"] < sqnr["activations only"]
    assert all(math.isfinite(value) for value in sqnr.values())


def test_a_score_target_with_evaluate():
    data = _data()
    model = Chain().eval()
    reference = model(data[0]).detach()

    def evaluate(candidate):  # a "score": negative output error, higher is better
        with torch.no_grad():
            return -float((candidate(data[0]) - reference).abs().mean())

    report = qf.analyze(model, data[0][:1], data, evaluate, CONFIG, target=-0.012)
    assert report.scores["float"] == 0.0 and report.scores["suggested"] >= -0.012
    assert report.scores["int8"] < -0.012 and report.sixteen_bit_layers


def test_report_files_and_bad_arguments(report, tmp_path):
    paths = report.save(str(tmp_path / "analysis"))
    assert {p.rsplit("/", 1)[1] for p in paths} == {
        "report.md", "report.html", "report.json", "sqnr.png", "ranges.png"}
    saved = json.loads((tmp_path / "analysis" / "report.json").read_text())["tensors"]
    # each tensor's float histogram holds every value it saw (4 batches of its shape)
    first = saved[0]
    assert len(first["histogram"]) == 48 and first["clip"] > 0 and sum(first["histogram"]) > 0
    page = (tmp_path / "analysis" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2  # self-contained: charts embedded
    assert "<td>c2</td>" in page and "Infinity" not in page
    assert (tmp_path / "analysis" / "sqnr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "analysis").iterdir() if p.name.startswith(".")]
    with pytest.raises(qf.ConfigError, match="is a file"):
        report.save(paths[0])
    with pytest.raises(qf.ConfigError, match="looks like a file name"):
        report.save(str(tmp_path / "analysis.json"))
    assert not (tmp_path / "analysis.json").exists()
    assert "c2" in str(report) and "| c2 |" in report.to_markdown().replace("c2_", "c2 ")
    data = _data(1)
    with pytest.raises(qf.ConfigError, match="evaluate"):
        qf.analyze(Chain(), data[0], data, evaluate="top1")
    with pytest.raises(qf.ConfigError, match="target"):
        qf.analyze(Chain(), data[0], data, target="high")
    prepared = qf.prepare(Chain(), data[0])  # analyze's own name, not prepare's
    with pytest.raises(qf.ConfigError, match="^analyze needs the float model.*quantfx.prepare"):
        qf.analyze(prepared, data[0], data)
    with pytest.raises(qf.ConfigError, match="^compare_bit_depths needs the float model"):
        qf.compare_bit_depths(prepared, data[0], data, lambda model: 1.0)


def test_evaluate_runs_the_float_model_in_eval_mode_and_leaves_it_as_it_was():
    """An `evaluate` that forgets model.eval() updated the user's BatchNorm statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    data = _data(2)
    modes = []

    def evaluate(candidate):
        modes.append(candidate.training)
        with torch.no_grad():
            return float(candidate(data[0]).mean())

    qf.analyze(model, data[0][:1], data, evaluate, CONFIG, target=-1e9)
    assert modes and not any(modes)
    assert model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name

    def validate_then_train(candidate):  # a training script's validate(): ends in train()
        with torch.no_grad():
            score = float(candidate(data[0]).mean())
        candidate.train()
        candidate(data[0])  # a forward in train mode: BatchNorm statistics move
        return score

    with pytest.raises(qf.ConfigError, match="evaluate.*only run the model"):
        qf.analyze(model, data[0][:1], data, validate_then_train, CONFIG, target=-1e9)
    for name, value in model.state_dict().items():  # the float model it ran was a copy
        assert torch.equal(value, before[name]), name


def test_report_json_is_valid_json_even_with_an_infinite_sqnr():
    """A tensor with no error at all has an infinite SQNR; report.json held `Infinity`."""
    report = qf.AnalysisReport()
    report.output_sqnr_db = {"int16": math.inf, "int8": 31.5}

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    parsed = json.loads(report.to_json(), parse_constant=refuse)
    assert parsed["output_sqnr_db"] == {"int16": None, "int8": 31.5}


def test_one_overall_bar_counts_every_calibration(monkeypatch):
    """analyze ran a dozen calibrations, each restarting its own bars with no overall one."""
    import quantfx.analysis.analyze as module

    bars = []

    class Recording(module.tqdm):
        def __init__(self, *args, **kwargs):
            assert kwargs.pop("disable") is None  # shown where the terminal shows bars
            super().__init__(*args, disable=False, file=io.StringIO(), **kwargs)
            bars.append(self)

    configs = []
    monkeypatch.setattr(module, "tqdm", Recording)
    monkeypatch.setattr(module, "calibrate", lambda prepared, batches: configs.append(
        state_of(prepared).config) or qf.calibrate(prepared, batches))
    data = _data()
    report = qf.analyze(Chain().eval(), data[0][:1], data,
                        config=replace(CONFIG, progress=True), target=200.0)
    assert len(bars) == 1 and bars[0].n == len(configs) == 3  # int8, int16, all candidates
    assert not report.reached and not any(config.progress for config in configs)


def test_report_without_matplotlib_keeps_the_numbers(report, tmp_path, monkeypatch):
    from quantfx.analysis import plots

    monkeypatch.setattr(plots, "_figure_class", lambda: None)
    paths = report.save(str(tmp_path / "plain"))
    assert {p.rsplit("/", 1)[1] for p in paths} == {"report.md", "report.html", "report.json"}
    page = (tmp_path / "plain" / "report.html").read_text()
    assert "pip install quantfx[plot]" in page and "<img" not in page


class _Untraceable(nn.Module):
    """`Chain` as the traceable part of a model whose forward branches on data."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Chain()

    def forward(self, x):
        y = self.backbone(x)
        return y * 2 if y.sum() > 0 else y


def test_a_partly_quantized_model_is_analyzed_in_its_parts_names():
    """quantize_only: each part's tensors, named by module path, the damaged layer first; the
    suggestion is a config that prepares (it ran on no input at all before: a TypeError)."""
    config = replace(CONFIG, quantize_only=("backbone",))
    data = _data()
    report = qf.analyze(_Untraceable().eval(), data[0][:1], data, config=config)
    assert report.tensors[0].layer == "backbone.c2"
    assert all(tensor.tensor.startswith("backbone.") for tensor in report.tensors)
    assert "backbone.c2" in report.sixteen_bit_layers
    suggested = report.config()
    assert suggested.quantize_only == ("backbone",)
    prepared = qf.prepare(_Untraceable().eval(), data[0][:1], suggested)
    qf.calibrate(prepared, data)
    assert prepared.backbone.c2.weight_quantizer.bits == 16


def test_the_suggested_config_keeps_the_config_analyze_measured_with(report):
    """`report.config()` starts from analyze's config (the target, the options), not the
    defaults: the suggestion was measured under them."""
    model = Chain()
    data = _data()
    analyzed = qf.analyze(model, data[0][:1], data, config=replace(CONFIG, target="tda4vm"))
    assert analyzed.config().target == "tda4vm"
    assert analyzed.config().weight_rounding == "nearest"
    assert analyzed.config(qf.QuantConfig()).target == "generic"
    assert json.loads(analyzed.to_json())["analyzed_with"]["target"] == "tda4vm"
    with pytest.raises(qf.ConfigError, match="got dict"):
        analyzed.config({})


def test_the_suggested_config_adds_to_the_16_bit_layers_analyze_measured_with():
    """analyze measured with `first` at 16 bit: its suggestion holds only with `first` kept
    (config() once replaced the layers with the suggestion alone)."""
    data = _data()
    analyzed = qf.analyze(Chain(), data[0][:1], data,
                          config=replace(CONFIG, sixteen_bit_layers=("first",)))
    layers = analyzed.config().sixteen_bit_layers
    assert layers[0] == "first" and set(analyzed.sixteen_bit_layers) <= set(layers)
    assert analyzed.config(qf.QuantConfig(sixteen_bit_layers=("last",))).sixteen_bit_layers[:2] \
        == ("last", "first")
