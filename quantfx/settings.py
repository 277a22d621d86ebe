"""QuantConfig fields from text: the command line's `--set FIELD=VALUE` and `--config FILE`
(TOML or JSON). Values are checked by `QuantConfig` itself; a misspelt field names the closest
one."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from quantfx.checks import check_choice
from quantfx.config import AUTO_PARTS, QATSchedule, QuantConfig
from quantfx.errors import ConfigError, LoadError

TEXT_FIELDS_EXCLUDED = ("autowrap_functions",)
"""Fields a text setting cannot give (functions)."""
SCHEDULE = "qat_schedule"
"""The field given by its own fields: `--set qat_schedule.ranges=learned`, or a TOML table
`[qat_schedule]` / a JSON object."""
LIST_FIELDS = ("sixteen_bit_layers", "leaf_modules", "quantize_only")


def _check_field(name: str, where: str, names: list[str]) -> None:
    """`name` is a field text can set; a field that holds functions says so."""
    if name in TEXT_FIELDS_EXCLUDED:
        raise ConfigError(f"{where} {name!r} holds Python functions, which text cannot give: "
                          "set it from Python (QuantConfig(autowrap_functions=(my_function,)))"
                          ", or make the model trace without it.")
    check_choice(name, where, names)


def settings_from_text(pairs: Sequence[str]) -> dict[str, Any]:
    """`QuantConfig` keywords from "field=value" texts (the command line's `--set`): true /
    false, none, numbers, comma-separated lists for the list fields, else the text itself."""
    names = [item.name for item in fields(QuantConfig) if item.name not in TEXT_FIELDS_EXCLUDED]
    settings: dict[str, Any] = {}
    schedule: dict[str, Any] = {}
    for pair in pairs:
        name, equals, text = (part.strip() for part in pair.partition("="))
        if not equals:
            raise ConfigError(f"--set {pair!r} must be FIELD=VALUE, e.g. "
                              "per_channel_depthwise=false.")
        owner, dot, inner = name.partition(".")
        if owner == SCHEDULE and dot:
            schedule[inner] = _value_from_text(inner, text)
            continue
        _check_field(name, f"--set {pair!r}: the field", names)
        settings[name] = _value_from_text(name, text)
    if schedule:
        settings[SCHEDULE] = _schedule(schedule, "--set qat_schedule.")
    return settings


def _schedule(values: dict[str, Any], where: str) -> QATSchedule:
    """A `QATSchedule` from its fields by name (checked by name, then by `QATSchedule`)."""
    for name in values:
        check_choice(name, f"{where}{name}: the QATSchedule field",
                     [item.name for item in fields(QATSchedule)])
    return QATSchedule(**values)


def _value_from_text(name: str, text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    if name in LIST_FIELDS and text != AUTO_PARTS:
        return tuple(item.strip() for item in text.split(",") if item.strip())
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def settings_from_file(path: str | os.PathLike) -> dict[str, Any]:
    """`QuantConfig` keywords from a TOML (`.toml`) or JSON file whose top-level keys are
    fields, e.g. `target = "tda4vm"` / `sixteen_bit_layers = ["first"]`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoadError(f"--config {path!r} is not a file: give a .toml or .json file of "
                        "QuantConfig fields.")
    if not path.endswith((".toml", ".json")):
        raise ConfigError(f"--config {path!r}: the file must end with .toml or .json.")
    try:
        with open(path, "rb") as handle:
            content = handle.read()
        if path.endswith(".toml"):
            import tomllib  # Python 3.11+

            settings = tomllib.loads(content.decode("utf-8-sig"))  # a Windows editor's BOM
        else:
            settings = json.loads(content.decode("utf-8-sig"))
    except ImportError:
        raise ConfigError("--config FILE.toml needs Python 3.11 or later (tomllib); give the "
                          "same fields as a .json file.") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {path!r} is not valid {path.rpartition('.')[2].upper()}: "
                          f"{str(error)[:200]}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"--config {path!r} must hold a table of QuantConfig fields.")
    names = [item.name for item in fields(QuantConfig) if item.name not in TEXT_FIELDS_EXCLUDED]
    for name, value in settings.items():
        _check_field(name, f"--config {path!r}: the field", names)
        if isinstance(value, list):
            settings[name] = tuple(value)
        elif name == SCHEDULE and isinstance(value, dict):
            settings[name] = _schedule(value, f"--config {path!r}: qat_schedule.")
    return settings
