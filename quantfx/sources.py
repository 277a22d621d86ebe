"""Data named by the user (the command line's `--calib`, `distill`'s image folder): an image
folder or a tensor file, read safely; and the safe reader of tensor files that the command
line's weights files use too (`quantfx.app.models`).

Files are never unpickled beyond tensors (`torch.load(..., weights_only=True)`, NumPy without
pickle), so a downloaded weights file cannot run code.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from quantfx.arguments import IMAGENET_MEAN, IMAGENET_STD
from quantfx.errors import LoadError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
TENSOR_SUFFIXES = (".pt", ".pth", ".npy")
UPSAMPLED = 2.0
"""Images whose median shorter side is this many times smaller than --resize get a warning:
a model trained on small images (32x32) was otherwise calibrated and exported at 224."""
LOG = logging.getLogger(__name__)


def read_tensors(path: str, what: str) -> Any:
    """`torch.load` restricted to tensors and plain containers, with errors that say why."""
    if not os.path.exists(path):
        raise LoadError(f"the {what} file {path!r} does not exist.")
    if os.path.isdir(path):
        raise LoadError(f"the {what} path {path!r} is a folder; give a file.")
    if path.endswith(".npy"):
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as error:
            raise LoadError(f"{path!r} is not a plain NumPy array file ({error}).") from error
    if os.path.getsize(path) == 0:
        raise LoadError(f"the {what} file {path!r} is empty (0 bytes): save it again.")
    if zipfile.is_zipfile(path) and any(name.endswith("/constants.pkl")
                                        for name in zipfile.ZipFile(path).namelist()):
        raise LoadError(f"{path!r} is a TorchScript archive (torch.jit.save), not a state "
                        "dict: save torch.save(model.state_dict(), path) from the eager model.")
    try:
        with warnings.catch_warnings():  # torch's own advice (weights_only=False) is not ours
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():  # not a pickled object: bytes torch cannot read
            raise LoadError(f"{path!r} is not a file torch.save wrote (or it is damaged); save "
                            "it again with torch.save.") from error
        raise LoadError(f"{path!r} holds more than tensors (a pickled model or object?); quantfx "
                        "reads only tensors and plain containers, never arbitrary pickles. Save "
                        "torch.save(model.state_dict(), path) (or a tensor) instead.") from error
    except (RuntimeError, EOFError, OSError) as error:
        raise LoadError(f"cannot read {path!r} as a torch file: {error}") from error
    except Exception as error:  # a corrupt file fails anywhere inside the unpickler
        raise LoadError(f"{path!r} is not a file torch.save wrote (or it is damaged): "
                        f"{type(error).__name__}: {error}. Save it again with torch.save."
                        ) from error


@dataclass
class ImageOptions:
    """How image files become model inputs: resize the shorter side, center crop, normalize."""

    resize: int = 256
    crop: int = 224
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    grayscale: bool = False


def _image_files(folder: str) -> list[str]:
    found = []
    for root, folders, files in os.walk(folder):
        folders.sort()
        found += [os.path.join(root, name) for name in sorted(files)
                  if name.lower().endswith(IMAGE_SUFFIXES)]
    return found


def _load_images(folder: str, limit: int, options: ImageOptions, progress: bool) -> Tensor:
    from PIL import Image, UnidentifiedImageError
    from torchvision import transforms

    files = _image_files(folder)
    if not files:
        raise LoadError(f"{folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)}), in it or "
                        "its subfolders.")
    _check_image_options(options)
    transform = transforms.Compose([
        transforms.Resize(options.resize), transforms.CenterCrop(options.crop),
        transforms.ToTensor(), transforms.Normalize(options.mean, options.std)])
    images, sides = [], []
    for path in tqdm(files[:limit], desc="reading images", unit="image", disable=not progress):
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
                images.append(transform(_eight_bit(image, options.grayscale)))
        except (UnidentifiedImageError, OSError) as error:
            raise LoadError(f"cannot read the image {path!r}: {error}") from error
    _warn_if_upsampled(sorted(sides)[len(sides) // 2], options)
    return torch.stack(images)


def _warn_if_upsampled(median_side: int, options: ImageOptions) -> None:
    """Say so when the images are blown up to the input size: the model (and its export) then
    sees inputs of a size it was likely not trained on."""
    if median_side * UPSAMPLED <= options.resize:
        LOG.warning(
            "the images' shorter side is about %d pixels, but they are resized to %d and "
            "cropped to %d (upsampled %.0fx); the model is calibrated and exported at %dx%d. "
            "If it was trained on %dx%d inputs, give --resize %d --crop %d.", median_side,
            options.resize, options.crop, options.resize / median_side, options.crop,
            options.crop, median_side, median_side, median_side, median_side)


def _check_image_options(options: ImageOptions) -> None:
    """Preprocessing that cannot be what the user meant is an error before any image is read."""
    channels = 1 if options.grayscale else 3
    if len(options.mean) != channels or len(options.std) != channels:
        raise LoadError(f"--mean and --std need {channels} values each for "
                        f"{'grayscale' if options.grayscale else 'RGB'} images.")
    if max(abs(value) for value in options.mean) > 1.0 or max(options.std) > 1.0:
        raise LoadError(
            f"--mean {','.join(map(str, options.mean))} / --std "
            f"{','.join(map(str, options.std))} look like 0..255 values (TI's style), but images "
            "are scaled to [0, 1] before normalizing: divide them by 255 (e.g. --mean "
            "0.485,0.456,0.406 --std 0.229,0.224,0.225).")
    if options.crop > options.resize:
        raise LoadError(f"--crop {options.crop} is larger than --resize {options.resize}: the "
                        "crop would be padded with zeros. Resize to at least the crop size.")


def _eight_bit(image: Any, grayscale: bool) -> Any:
    """`image` as 8-bit RGB (or L): 16-bit images scaled down (not saturated at 255), palette
    and alpha images converted."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(image, dtype=np.float64)
        values = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(values, mode="L")
    return image.convert("L" if grayscale else "RGB")


def _as_float(tensor: Tensor, path: str) -> Tensor:
    if tensor.dtype in (torch.float16, torch.bfloat16, torch.float64):
        return tensor.float()
    if tensor.dtype != torch.float32:
        raise LoadError(f"{path!r} holds {tensor.dtype} tensors; calibration inputs must be "
                        "floating point, scaled and normalized as the model was trained.")
    return tensor


def _inputs_and_labels(data: Any) -> bool:
    """Two tensors, the second integer labels of the first's samples (one rank lower or
    more): a data set saved whole, not two batches."""
    return (isinstance(data, (list, tuple)) and len(data) == 2
            and all(isinstance(item, Tensor) for item in data)
            and data[0].dim() >= 2 and data[1].dim() < data[0].dim()
            and not data[1].is_floating_point() and len(data[1]) == len(data[0]))


def _tensor_batches(path: str, limit: int, batch_size: int) -> list[Tensor]:
    data = read_tensors(path, "calibration")
    if isinstance(data, dict):
        tensors = [value for value in data.values() if isinstance(value, Tensor)]
        if len(tensors) != 1:
            raise LoadError(f"{path!r} holds a dict with {len(tensors)} tensors; save one tensor "
                            "of inputs (N, ...) or a list of batches.")
        data = tensors[0]
    if _inputs_and_labels(data):  # torch.save((images, labels), path): the inputs
        LOG.info("%s holds (inputs, labels): calibrating on the inputs", path)
        data = data[0]
    if isinstance(data, Tensor):
        if data.dim() < 2:
            raise LoadError(f"{path!r} holds a tensor of shape {tuple(data.shape)}; save the "
                            "calibration inputs as one tensor (N, C, H, W) or a list of batches.")
        return list(_as_float(data[:limit], path).split(batch_size))
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, Tensor) for t in data):
        batches, count = [], 0
        for batch in data:
            if count >= limit:
                break
            batches.append(_as_float(batch[:limit - count], path))
            count += len(batches[-1])
        return batches
    raise LoadError(f"{path!r} holds a {type(data).__name__}; save one tensor of inputs (N, ...) "
                    "or a list of batch tensors.")


def load_calibration(path: str | os.PathLike, limit: int = 256, batch_size: int = 16,
                     images: ImageOptions | None = None, progress: bool = True,
                     what: str = "calibration") -> list[Tensor]:
    """Calibration batches from an image folder (searched recursively, sorted, at most `limit`
    images, transformed by `images`) or a tensor file (.pt/.pth: a tensor (N, ...), a list of
    batches, or (inputs, labels); .npy: an array (N, ...)). `what` names the data in errors."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return list(_load_images(path, limit, images or ImageOptions(), progress).split(
            batch_size))
    if not os.path.exists(path):
        raise LoadError(f"the {what} data {path!r} does not exist; give an image folder or "
                        "a tensor file (.pt, .npy).")
    if not path.endswith(TENSOR_SUFFIXES):
        raise LoadError(f"{path!r} is neither a folder of images nor a tensor file "
                        f"({', '.join(TENSOR_SUFFIXES)}).")
    return _tensor_batches(path, limit, batch_size)
