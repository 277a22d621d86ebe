"""Type and range checks for every option a user passes, with messages that say the fix.

A bool must be a bool (the string "False" is true in Python), an int an int (not a bool, not
8.0), a number a finite int or float. Each check raises the `QuantFxError` subclass its caller
names, so `export_onnx(threads="2")` is an `ExportError` and `QuantConfig(percentile="99")` a
`ConfigError`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from quantfx.errors import ConfigError, QuantFxError


def check_bool(value: Any, name: str, error: type[QuantFxError] = ConfigError) -> bool:
    """`value` if it is a bool, else `error`."""
    if not isinstance(value, bool):
        kind = type(value)
        named = kind.__name__ if kind.__module__ == "builtins" else (
            f"{kind.__module__}.{kind.__qualname__}")  # numpy's bool is also called "bool"
        raise error(f"{name}={value!r} must be True or False (a bool, not {named}).")
    return value


def check_int(value: Any, name: str, minimum: int | None = None,
              error: type[QuantFxError] = ConfigError, example: str = "") -> int:
    """`value` if it is an int (not a bool) of at least `minimum`, else `error`."""
    if not isinstance(value, int) or isinstance(value, bool) or (
            minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        hint = f" (e.g. {example})" if example else ""
        raise error(f"{name}={value!r} must be an integer{bound}{hint}.")
    return value


def check_number(value: Any, name: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, error: type[QuantFxError] = ConfigError,
                 example: str = "") -> float:
    """`value` as a float if it is a finite int/float in the range, else `error`."""
    number_like = isinstance(value, (int, float)) and not isinstance(value, bool)
    valid = number_like and math.isfinite(value)
    if valid and low is not None:
        valid = value > low if low_open else value >= low
    if valid and high is not None:
        valid = value <= high
    if not valid:
        left = "(" if low_open or low is None else "["
        upper = f"{high}]" if high is not None else "inf)"  # finite: never inf itself
        span = (f" in {left}{low if low is not None else '-inf'}, {upper}"
                if (low, high) != (None, None) else "")
        hint = f" (e.g. {example})" if example else ""
        raise error(f"{name}={value!r} must be a finite number{span}{hint}.")
    return float(value)


def check_choice(value: Any, name: str, choices: Sequence[str],
                 error: type[QuantFxError] = ConfigError) -> str:
    """`value` if it is one of `choices`, else `error` naming the closest choice."""
    if not isinstance(value, str) or value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise error(f"{name}={value!r} is not one of {tuple(choices)}.{hint}")
    return value


def as_tuple(value: Any, name: str, is_item: Callable[[Any], bool], describe: str,
             error: type[QuantFxError] = ConfigError) -> tuple:
    """`value` as a tuple of items: None is empty, a single item is a 1-tuple, any other
    iterable is taken item by item; every item must pass `is_item`."""
    if value is None:
        return ()
    if is_item(value) or isinstance(value, str):
        items: Iterable[Any] = (value,)
    else:
        try:
            items = tuple(value)
        except TypeError:
            raise error(f"{name}={value!r} must be a list of {describe}.") from None
    items = tuple(items)
    for item in items:
        if not is_item(item):
            raise error(f"{name} holds {item!r}: give {describe}.")
    return items


def check_keywords(given: Iterable[str], allowed: Iterable[str], owner: str) -> None:
    """`ConfigError` for a keyword `owner` does not take, naming the closest one."""
    allowed = list(allowed)
    for keyword in given:
        if keyword not in allowed:
            close = difflib.get_close_matches(keyword, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{owner} has no option {keyword!r}.{hint} Its options: "
                              f"{', '.join(allowed)}.")
