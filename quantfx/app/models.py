"""The models the command line names: a torchvision name or a `module:factory`, with a weights
file read safely (tensors only, `quantfx.sources.read_tensors`), and input shapes as text."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from typing import Any

import torch
from torch import Tensor, nn

from quantfx.errors import LoadError
from quantfx.sources import read_tensors

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
"""Keys under which training checkpoints commonly keep the model's state dict."""


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models())


def _factory(spec: str) -> Any:
    """The callable named by `package.module:name` or `path/to/file.py:name`."""
    module_name, _, attribute = spec.rpartition(":")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise LoadError(f"{module_name!r} does not exist; give the Python file that defines "
                            f"{attribute!r}.")
        location = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(module_name))[0], module_name)
        module = importlib.util.module_from_spec(location)
        sys.path.insert(0, os.path.dirname(os.path.abspath(module_name)))
        try:
            location.loader.exec_module(module)
        except Exception as error:
            raise LoadError(f"importing {module_name!r} failed: {type(error).__name__}: "
                            f"{error}") from error
        finally:
            sys.path.pop(0)
    else:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the user's own package
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise LoadError(f"cannot import {module_name!r} ({error}); install its package or "
                            "run from the folder that holds it.") from error
        finally:
            sys.path.pop(0)
    if not hasattr(module, attribute):
        raise LoadError(f"{module_name!r} has no {attribute!r}.")
    return getattr(module, attribute)


def load_model(spec: str, weights: str | os.PathLike | None = None) -> nn.Module:
    """The float model `spec` names, in eval mode: a torchvision builder name ("resnet18",
    random weights, seeded, unless `weights` is given) or `module:factory` / `file.py:factory`
    (called with no arguments). `weights` is a state dict file (or a checkpoint holding one)."""
    if not isinstance(spec, str) or not spec:
        raise LoadError(f"the model must be a name such as 'resnet18' or 'package.module:"
                        f"build', got {spec!r}.")
    if ":" in spec.strip(":"):
        built = _factory(spec)
        try:
            model = built() if callable(built) and not isinstance(built, nn.Module) else built
        except Exception as error:
            raise LoadError(f"{spec}() failed: {type(error).__name__}: {error}") from error
    else:
        names = _torchvision_names()
        if spec not in names:
            close = difflib.get_close_matches(spec, names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise LoadError(f"{spec!r} is not a torchvision model.{hint} For your own model give "
                            "'package.module:factory' or 'file.py:factory'.")
        import torchvision

        with torch.random.fork_rng():  # the same random weights on every run
            torch.manual_seed(0)
            model = torchvision.models.get_model(spec, weights=None)
    if not isinstance(model, nn.Module):
        raise LoadError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module.")
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict file into `model` (strict; "module." prefixes of DDP are dropped)."""
    state = read_tensors(os.fspath(path), "weights")
    if isinstance(state, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise LoadError(f"{os.fspath(path)!r} is not a state dict (a dict of tensors); save "
                        "torch.save(model.state_dict(), path).")
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1:3]
        raise LoadError(f"{os.fspath(path)!r} does not fit {type(model).__name__}: "
                        + " ".join(line.strip() for line in first)) from error


def parse_shape(text: str) -> tuple[int, ...]:
    """"1,3,224,224" (or "1x3x224x224") -> (1, 3, 224, 224)."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        raise LoadError(f"the input shape {text!r} is not a list of integers such as "
                        "1,3,224,224.") from None
    if not shape or any(size < 1 for size in shape):
        raise LoadError(f"the input shape {text!r} has a size below 1.")
    return shape
