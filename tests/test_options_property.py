"""Property tests of option checking: whatever junk a user passes as a `QuantConfig` /
`QATSchedule` field or an `export_onnx` keyword, quantfx either accepts it (when it is valid) or
raises a `QuantFxError` subclass; never a TypeError, AttributeError or RuntimeError from inside.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import quantfx as qf
from quantfx import QATSchedule, QuantConfig, QuantFxError
from quantfx.config import WEIGHT_ROUNDINGS
from quantfx.tidl.profiles import resolve_target

SETTINGS = settings(deadline=None, max_examples=60, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.sampled_from([0, 1, 4, 8, 16, 32, 64, 100, 128, 2048, 4096, -8, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([8.0, 16.0, 0.5, 99.0, 99.99, 100.0, 1.5, -0.1, float("nan")]),
    st.text(max_size=5),
    st.sampled_from(["8", "False", "True", "mse", "minmax", "first", "none", "histogram", "tda4vm",
                     "am68a", "TDA4VM", "nearest", "learned", "Learned", "statistics",
                     "calibrated"]),
    st.lists(st.integers(-3, 20), max_size=3),
    st.lists(st.text(max_size=3), max_size=3),
    st.lists(st.sampled_from([nn.ReLU, nn.Module, int, len, math.sqrt, "head", "a.b", ""]),
             max_size=3),
    st.tuples(st.integers(), st.text(max_size=2)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.binary(max_size=3),
    st.sampled_from([nn.ReLU, nn.Module, int, len, print, object(), QATSchedule(),
                     QuantConfig(progress=False), torch.tensor(8), torch.tensor([8, 16]),
                     np.int64(8), np.float64(0.5), np.array([8, 16]), Ellipsis, 1 + 2j]),
)
"""Values a confused user (or a config file parser) might hand over as an option."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sequence_of(is_item):
    """What `as_tuple` takes: None, one item, or an iterable of items."""
    def valid(value) -> bool:
        if value is None or is_item(value):
            return True
        if isinstance(value, str):
            return False
        try:
            return all(is_item(item) for item in value)
        except TypeError:
            return False
    return valid


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


VALIDITY = {
    "activation_bits": lambda v: _is_int(v) and v in (8, 16),
    "weight_bits": lambda v: _is_int(v) and v in (8, 16),
    "target": lambda v: isinstance(v, str) and resolve_target(v) in qf.TARGETS,  # any case
    "per_channel_depthwise": lambda v: v is None or isinstance(v, bool),
    "per_channel_weights": lambda v: v is None or isinstance(v, bool),
    "equalization": lambda v: v is None or isinstance(v, bool),
    "align_bounded_activations": lambda v: isinstance(v, bool),
    "bias_calibration": lambda v: isinstance(v, bool),
    "nonnegative_inputs": lambda v: isinstance(v, bool),
    "widen_coarse_weights": lambda v: isinstance(v, bool),
    "widen_sensitive_layers": lambda v: isinstance(v, bool),
    "progress": lambda v: isinstance(v, bool),
    "activation_observer": lambda v: isinstance(v, str)
    and v in ("minmax", "moving_average", "histogram"),
    "weight_observer": lambda v: isinstance(v, str) and v in ("minmax", "mse"),
    "range_search": lambda v: isinstance(v, str) and v in ("mse", "percentile", "none"),
    "weight_rounding": lambda v: v is None or (isinstance(v, str) and v in WEIGHT_ROUNDINGS),
    "percentile": lambda v: _is_number(v) and 50 < v <= 100,
    "histogram_bins": lambda v: _is_int(v) and v >= 64 and v & (v - 1) == 0,
    "moving_average_momentum": lambda v: _is_number(v) and 0 < v <= 1,
    "bias_calibration_samples": lambda v: _is_int(v) and v >= 1,
    "qat_schedule": lambda v: v is None or isinstance(v, QATSchedule),
    "sixteen_bit_layers": _sequence_of(lambda item: isinstance(item, str)),
    "leaf_modules": _sequence_of(lambda item: isinstance(item, str) or (
        isinstance(item, type) and issubclass(item, nn.Module))),
    "autowrap_functions": _sequence_of(
        lambda item: callable(item) and not isinstance(item, type)),
    "quantize_only": lambda v: v == "auto" or _sequence_of(
        lambda item: isinstance(item, str) and item not in ("", "auto"))(v),
}
"""What each field accepts: construction succeeds exactly for these (valid values included:
infinity where a finite number is required, or a class among functions, once passed)."""

SCHEDULE_VALIDITY = {
    "freeze_bn_step": lambda v: v is None or (_is_int(v) and v >= 0),
    "freeze_ranges_step": lambda v: v is None or (_is_int(v) and v >= 0),
    "freeze_bn_epoch": lambda v: v is None or (_is_int(v) and v >= 0),
    "freeze_ranges_epoch": lambda v: v is None or (_is_int(v) and v >= 0),
    "weight_clip_std": lambda v: v is None or (_is_number(v) and v > 1),
    "weight_exponent": lambda v: isinstance(v, str) and v in ("minmax", "mse", "calibrated",
                                                              "learned"),
    "ranges": lambda v: isinstance(v, str) and v in ("calibrated", "statistics", "learned"),
}

CONFIG_FIELDS = [item.name for item in dataclasses.fields(QuantConfig)]
SCHEDULE_FIELDS = [item.name for item in dataclasses.fields(QATSchedule)]


def _construct(cls, name: str, value, validity: dict) -> None:
    """Build `cls(name=value)`: a QuantFxError or success, and success exactly when valid."""
    try:
        cls(**{name: value})
    except QuantFxError:
        accepted = False
    else:
        accepted = True
    if name in validity:
        assert accepted == validity[name](value), (name, value, accepted)


def test_every_field_has_a_strategy() -> None:
    assert set(CONFIG_FIELDS) == set(VALIDITY)
    assert set(SCHEDULE_FIELDS) == set(SCHEDULE_VALIDITY)


@pytest.mark.parametrize("name", CONFIG_FIELDS)
@SETTINGS
@given(value=JUNK)
def test_quant_config_field_junk_is_accepted_or_a_quantfx_error(name, value) -> None:
    _construct(QuantConfig, name, value, VALIDITY)


@pytest.mark.parametrize("name", SCHEDULE_FIELDS)
@SETTINGS
@given(value=JUNK)
def test_qat_schedule_field_junk_is_accepted_or_a_quantfx_error(name, value) -> None:
    _construct(QATSchedule, name, value, SCHEDULE_VALIDITY)


@SETTINGS
@given(value=JUNK)
def test_a_field_set_after_construction_is_checked_by_validate(value) -> None:
    for name in CONFIG_FIELDS:
        config = QuantConfig(progress=False)
        setattr(config, name, value)
        try:
            config.validate()
        except QuantFxError:
            accepted = False
        else:
            accepted = True
        if name in VALIDITY:
            assert accepted == VALIDITY[name](value), (name, value, accepted)


# ----------------------------------------------------------------------------------------------
# export_onnx keywords


def _tiny_converted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(1, 3, 8, 8, generator=generator) for _ in range(2)]
    # 8 bit only (no measured 16-bit output): every opset of VALID_EXPORT can hold the file
    prepared = qf.prepare(model, (data[0],), QuantConfig(progress=False, bias_calibration=False,
                                                         widen_sensitive_layers=False))
    qf.calibrate(prepared, data)
    return qf.convert(prepared), data[0]


CONVERTED, EXAMPLE = _tiny_converted()

EXPORT_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 30),
                        st.floats(allow_nan=True), st.text(max_size=5),
                        st.lists(st.integers(), max_size=3))
EXPORT_KEYWORDS = ("opset", "verify", "legacy", "max_lsb_diff", "threads", "verify_data")


EXPORT_SETTINGS = settings(deadline=None, max_examples=80, derandomize=True, database=None,
                           suppress_health_check=[HealthCheck.too_slow])


def _export(options: dict, valid: bool = False) -> None:
    """Export with `options`: success writes both files, a QuantFxError writes nothing (and
    fails the test when every option is `valid`), any other exception fails the test."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        try:
            report = qf.export_onnx(CONVERTED, (EXAMPLE,), path, **options)
        except QuantFxError:
            assert not valid, f"valid options {options} refused"
            assert os.listdir(folder) == []  # a refused export writes nothing
        else:
            assert sorted(os.listdir(folder)) == ["model.onnx", "model.tidl.json"]
            assert report.verified == options.get("verify", True)


@EXPORT_SETTINGS
@given(options=st.fixed_dictionaries(
    {}, optional={keyword: EXPORT_JUNK for keyword in EXPORT_KEYWORDS}))
def test_export_keyword_junk_exports_or_is_a_quantfx_error(options) -> None:
    _export(options)


EXTRA = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
VALID_EXPORT = {
    "opset": st.sampled_from([None, 11, 13, 17, 21]),
    "verify": st.booleans(),
    "legacy": st.booleans(),
    "max_lsb_diff": st.one_of(st.none(), st.floats(0.0, 8.0)),
    "threads": st.integers(1, 2),
    "verify_data": st.sampled_from([None, EXTRA, (EXTRA,), [EXTRA], [EXTRA[:1], (EXTRA,)]]),
}


@EXPORT_SETTINGS
@given(data=st.data(), junk=st.sampled_from(EXPORT_KEYWORDS))
def test_one_junk_keyword_among_valid_ones(data, junk) -> None:
    options = data.draw(st.fixed_dictionaries(
        {junk: EXPORT_JUNK},
        optional={keyword: VALID_EXPORT[keyword] for keyword in EXPORT_KEYWORDS
                  if keyword != junk}))
    _export(options)


def _legacy_below_13(options: dict) -> dict:
    """QDQ needs opset 13 (per-channel DequantizeLinear): opset 11 is valid with legacy=True."""
    return {**options, "legacy": True} if options.get("opset") == 11 else options


@EXPORT_SETTINGS
@given(options=st.fixed_dictionaries({}, optional=VALID_EXPORT).map(_legacy_below_13))
def test_valid_keywords_always_export(options) -> None:
    """Valid options are accepted, in any combination (a valid threads=2 was once refused)."""
    _export(options, valid=True)
