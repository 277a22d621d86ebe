"""End to end over real torchvision architectures: prepare → calibrate → convert → agreement.

Random weights (with non-trivial BatchNorm statistics) and random data: this checks that every
architecture traces, places quantizers sensibly and simulates fixed point closely; accuracy on
real data is the benchmarks' job. SQNR figures print with `pytest -s -k sqnr`.
"""

import pytest
import torch
import torchvision

import quantfx as qf
from quantfx.qmath import sqnr_db
from tests.helpers import randomize_batchnorm

MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "shufflenet_v2_x0_5",
    "efficientnet_b0",
    "squeezenet1_0",
    "mnasnet0_5",
    "densenet121",
    "googlenet",
    "resnext50_32x4d",
]
MIN_SQNR_DB = 15.0


def build(name: str) -> torch.nn.Module:
    options = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.get_model(name, num_classes=10, **options)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_model_sqnr(name):
    model = build(name)
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(4, 3, 96, 96, generator=generator) for _ in range(4)]
    test_input = torch.randn(4, 3, 96, 96, generator=generator)
    prepared = qf.prepare(model, (calibration[0][:1],))
    qf.calibrate(prepared, calibration)
    converted = qf.convert(prepared)
    with torch.no_grad():
        reference = model(test_input)
        quantized = converted(test_input)
    sqnr = sqnr_db(reference, quantized)
    print(f"\nSQNR {name}: {sqnr:.1f} dB")
    assert sqnr > MIN_SQNR_DB
    assert quantized.shape == reference.shape
