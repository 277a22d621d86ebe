"""Tracing: fx.wrap and leaf modules are honoured; failures say where and how to fix."""

import pytest
import torch
import torch.fx
from torch import nn

import quantfx as qf
from quantfx.config import QuantConfig
from quantfx.trace import trace


def data_dependent(x):
    if x.sum() > 0:  # untraceable: control flow on a tensor value
        return x * 2
    return x


@torch.fx.wrap
def wrapped_data_dependent(x):
    if x.sum() > 0:
        return x * 2
    return x


class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # the line the error must point at
            return x
        return -x


class Net(nn.Module):
    """Calls `function` (looked up as a global, as fx.wrap requires) after a conv."""

    def __init__(self, function: str = ""):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gate = Gate()
        self.function = function

    def forward(self, x):
        x = self.conv(x)
        if self.function == "wrapped":
            x = wrapped_data_dependent(x)
        elif self.function == "plain":
            x = data_dependent(x)
        return self.gate(x)


def test_untraceable_module_names_module_and_line():
    with pytest.raises(qf.TraceError) as caught:
        qf.prepare(Net(), torch.randn(1, 3, 4, 4))
    message = str(caught.value)
    assert "'gate' (Gate)" in message
    assert "test_trace.py" in message and "if x.mean() > 0" in message
    assert "torch.fx.wrap" in message and "leaf_modules" in message


def test_leaf_module_by_type_and_by_name():
    for leaf in (Gate, "gate"):
        graph_module = trace(Net(), QuantConfig(leaf_modules=[leaf]))
        targets = [node.target for node in graph_module.graph.nodes if node.op == "call_module"]
        assert "gate" in targets


def test_fx_wrap_and_autowrap_functions_are_honoured():
    graph_module = trace(Net("wrapped"), QuantConfig(leaf_modules=[Gate]))
    functions = [node.target for node in graph_module.graph.nodes if node.op == "call_function"]
    assert wrapped_data_dependent in functions
    with pytest.raises(qf.TraceError, match="(?s)control flow.*Fix: "):
        trace(Net("plain"), QuantConfig(leaf_modules=[Gate]))
    config = QuantConfig(leaf_modules=[Gate], autowrap_functions=[data_dependent])
    graph_module = trace(Net("plain"), config)
    assert data_dependent in [node.target for node in graph_module.graph.nodes]


def test_wrapped_function_output_is_quantized():
    config = QuantConfig(leaf_modules=[Gate])
    prepared = qf.prepare(Net("wrapped"), torch.randn(1, 3, 4, 4), config)
    assert "quantizers.wrapped_data_dependent" in dict(prepared.named_modules())
    assert "quantizers.gate" in dict(prepared.named_modules())


class Pieces(nn.Module):
    """YOLOv8's C2f idiom: a list made of a chunk (or a split into listed sizes), grown and
    concatenated; or, with `how="unknown"`, a list of a split whose piece count is unknown."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.how = how

    def forward(self, x):
        x = self.conv(x)
        if self.how == "chunk":
            parts = list(x.chunk(2, 1))
        elif self.how == "split":
            parts = list(torch.split(x, [2, 6], 1))
        else:
            parts = list(x.split(4, 1))
        parts.append(parts[-1] * 2)
        return torch.cat(parts, 1)


@pytest.mark.parametrize("how", ["chunk", "split"])
def test_a_list_of_chunk_or_listed_split_pieces_traces(how):
    model = Pieces(how).eval()
    example = torch.randn(1, 3, 4, 4)
    graph_module = trace(model, QuantConfig())
    torch.testing.assert_close(graph_module(example), model(example))


def test_a_list_of_pieces_of_unknown_count_is_a_trace_error():
    with pytest.raises(qf.TraceError, match="Proxy object cannot be iterated|len"):
        qf.prepare(Pieces("unknown"), torch.randn(1, 3, 4, 4))


class WidthChecked(nn.Module):
    """Checks its input's width as torchvision's ViT checks the image size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        torch._assert(x.shape[-1] == 8, f"Wrong width! Expected 8 but got {x.shape[-1]}!")
        return self.conv(x)


def test_a_models_own_assert_keeps_its_check_and_a_readable_message():
    """The message was formatted while tracing: 'but got Proxy(getitem_1)!'."""
    prepared = qf.prepare(WidthChecked().eval(), torch.randn(1, 3, 8, 8))
    with pytest.raises(AssertionError, match=r"but got another value than at prepare! \(a "
                                             r"quantfx model runs at the sizes") as raised:
        prepared(torch.randn(1, 3, 8, 16))
    assert "Proxy" not in str(raised.value)
