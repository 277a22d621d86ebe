"""The one-pass layer-wise runner: each node runs once per stream however deep the model is,
each layer sees its quantized input and its float output, and bias calibration through it
gives what the level-by-level bias calibration gives."""

from __future__ import annotations

import torch
from torch import nn

import quantfx as qf
from quantfx.layers import FakeQuantLayer
from quantfx.ptc.bias_calibration import calibrate_biases
from quantfx.ptc.learned_rounding import learn_rounding
from quantfx.ptc.reconstruction import (
    concatenated,
    correct_bias,
    memory_limit,
    reconstruct_layers,
    samples_within,
)

CONFIG = dict(progress=False, bias_calibration=True,
              weight_rounding="nearest")  # bias calibration's own pass, not the rounding's


class Residual(nn.Module):
    """Eight convs with two skip connections: values must live until their last user."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(6))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for index in range(0, 6, 3):
            y = torch.relu(self.body[index](x))
            y = torch.relu(self.body[index + 1](y))
            x = x + self.body[index + 2](y)
        return self.head(x)


def _calibrated(bias_calibration: bool = False):
    torch.manual_seed(0)
    model = Residual().eval()
    data = [torch.randn(4, 3, 10, 10) for _ in range(3)]
    config = qf.QuantConfig(**(CONFIG | {"bias_calibration": bias_calibration}))
    prepared = qf.prepare(model, data[0][:1], config)
    qf.calibrate(prepared, data)
    return prepared, [(batch,) for batch in data]


def test_every_layer_runs_twice_per_pass_however_deep():
    prepared, batches = _calibrated()
    calls = {}

    def count(name: str):
        def hook(module, args, output) -> None:
            if len(args[0]) == 12:  # all kept samples (a one-sample probe sizes the budget)
                calls[name] = calls.get(name, 0) + 1
        return hook

    handles = [module.register_forward_hook(count(name)) for name, module
               in prepared.named_modules() if isinstance(module, FakeQuantLayer)]
    learn_rounding(prepared, batches, progress=False, iterations=2)
    for handle in handles:
        handle.remove()
    assert len(calls) == 8
    assert set(calls.values()) == {2}  # float and quantized stream, never re-run per layer


def test_each_layer_sees_its_quantized_input_and_float_output():
    prepared, batches = _calibrated()
    inputs = torch.cat([batch for (batch,) in batches])
    with torch.no_grad():
        float_output = prepared.stem.layer(inputs)  # the stem's float output
    seen = {}

    def step(layer, quantized_input, target, activation):
        seen.setdefault("stem", (quantized_input, target, activation))

    reconstruct_layers(prepared, batches, step, progress=False)
    quantized_input, target, activation = seen["stem"]
    assert torch.allclose(target, float_output)
    assert not torch.equal(quantized_input, inputs)  # the input quantizer ran
    assert torch.allclose(quantized_input, inputs, atol=2 ** -4)
    assert isinstance(activation, nn.ReLU)  # the ReLU fused into the stem


def test_bias_correction_in_one_pass_matches_bias_calibration():
    prepared, batches = _calibrated(bias_calibration=True)  # with_bias: every layer has one
    expected = {name: module.layer.bias.detach().clone()
                for name, module in prepared.named_modules() if isinstance(module, FakeQuantLayer)}
    for module in prepared.modules():
        if isinstance(module, FakeQuantLayer):
            module.layer.bias.data.copy_(module.float_bias)
    reconstruct_layers(prepared, batches,
                       lambda layer, inputs, target, _: correct_bias(layer, inputs, target),
                       progress=False)
    for name, module in prepared.named_modules():
        if isinstance(module, FakeQuantLayer):
            assert torch.allclose(module.layer.bias, expected[name], atol=1e-6), name
    calibrate_biases(prepared, batches, progress=False)  # and the level runner agrees again
    for name, module in prepared.named_modules():
        if isinstance(module, FakeQuantLayer):
            assert torch.allclose(module.layer.bias, expected[name], atol=1e-6), name


def test_the_sample_budget_counts_bytes():
    prepared, batches = _calibrated()
    assert len(concatenated(samples_within(prepared, batches, 1 << 30))[0]) == 12
    one_sample = samples_within(prepared, batches, 1)  # nothing fits: still one sample
    assert len(concatenated(one_sample)[0]) == 1
    # the stem's and a block's output live together: 2 x 8 x 10 x 10 floats per stream
    budget = samples_within(prepared, batches, 2 * 2 * 8 * 100 * 4 * 5)
    assert 2 <= len(concatenated(budget)[0]) <= 5


def test_the_memory_limit_follows_the_device(monkeypatch):
    """On a GPU the kept samples live in GPU memory: the budget is a quarter of its free bytes."""
    asked = []

    def free_and_total(device):
        asked.append(device)
        return 8 << 30, 80 << 30

    monkeypatch.setattr(torch.cuda, "mem_get_info", free_and_total)
    assert memory_limit(torch.device("cuda", 1)) == 2 << 30
    assert asked == [torch.device("cuda", 1)]
    assert memory_limit(torch.device("cpu")) == memory_limit() > 0
