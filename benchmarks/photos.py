"""Real photos with no download: the images bundled in the scikit-image and scikit-learn wheels.

They give ImageNet models realistic calibration and evaluation inputs offline. The split is by
photo, so no evaluation crop shares a scene with a calibration crop:

- evaluation: astronaut, chelsea (a tabby cat), coffee (a cup of espresso), rocket, china (a
  temple): natural scenes with clear ImageNet subjects, so float predictions can be checked;
- calibration: motorcycle_left/right (stereo pair), flower, hubble_deep_field, retina,
  immunohistochemistry, and the grayscale camera, brick, grass and gravel copied to 3 channels.

colorwheel (synthetic) and the binary/text images of scikit-image are left out.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CALIBRATION_PHOTOS", "EVALUATION_PHOTOS", "PHOTO_NAMES", "calibration_and_evaluation",
           "crops", "full_frames", "load_photos"]

EVALUATION_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "china")
CALIBRATION_PHOTOS = ("motorcycle_left", "motorcycle_right", "flower", "hubble_deep_field",
                      "retina", "immunohistochemistry", "camera", "brick", "grass", "gravel")
PHOTO_NAMES = EVALUATION_PHOTOS + CALIBRATION_PHOTOS

MIN_SCALE = 0.3
"""Smallest crop side, as a fraction of the photo's short side (the largest is 1.0)."""


def _skimage_photos() -> dict[str, np.ndarray]:
    """The photos bundled in the scikit-image wheel (its loaders read them, no pooch download)."""
    from skimage import data

    left, right, _ = data.stereo_motorcycle()
    photos = {"motorcycle_left": left, "motorcycle_right": right}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
                 "immunohistochemistry", "camera", "brick", "grass", "gravel"):
        photos[name] = getattr(data, name)()
    return photos


def _sklearn_photos() -> dict[str, np.ndarray]:
    """china and flower, the JPEGs of sklearn.datasets.load_sample_images, read the same way
    (Pillow) but without importing scikit-learn, which costs over a second (scipy)."""
    from PIL import Image

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the photos china and flower need scikit-learn: "
                                  "pip install scikit-learn")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "images"
    photos = {}
    for name in ("china", "flower"):
        with Image.open(folder / f"{name}.jpg") as image:
            photos[name] = np.asarray(image)
    return photos


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3, read-only: grayscale is copied to 3 channels, alpha dropped."""
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 photo, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(image[:, :, :3])
    image.setflags(write=False)
    return image


@functools.cache
def _load_all() -> dict[str, np.ndarray]:
    """Every photo, decoded once per process."""
    photos = {**_skimage_photos(), **_sklearn_photos()}
    return {name: _as_rgb(photos[name]) for name in PHOTO_NAMES}


def load_photos() -> dict[str, np.ndarray]:
    """Name -> read-only uint8 H x W x 3 RGB photo, for every name in PHOTO_NAMES (memoized)."""
    return dict(_load_all())


def _resize(region: np.ndarray, size: int, flip: bool) -> torch.Tensor:
    """uint8 H x W x 3 region -> uint8 3 x size x size (bilinear, antialiased), maybe mirrored.

    Resizing the uint8 channels-last tensor directly is ~10x faster than going through float.
    """
    x = torch.from_numpy(np.array(region)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)[0]
    return (x.flip(-1) if flip else x).contiguous()


def _check_names(names: Sequence[str]) -> None:
    """Raise a ValueError listing the valid names when one is unknown or none is given."""
    unknown = [n for n in names if n not in PHOTO_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown or no photo names {unknown}; choose from {PHOTO_NAMES}")


def crops(photo_names: Sequence[str], count: int, size: int, seed: int) -> torch.Tensor:
    """`count` random square crops -> uint8 count x 3 x size x size, deterministic in `seed`.

    Photos are taken in turns (shuffled order); each crop's side is uniform in 0.3..1.0 of the
    photo's short side at a random position, mirrored half of the time.
    """
    _check_names(photo_names)
    photos = _load_all()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(photo_names))
    out = torch.empty(count, 3, size, size, dtype=torch.uint8)
    for i in range(count):
        photo = photos[photo_names[order[i % len(order)]]]
        height, width = photo.shape[:2]
        side = max(1, round(min(height, width) * rng.uniform(MIN_SCALE, 1.0)))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        flip = bool(rng.integers(0, 2))
        out[i] = _resize(photo[top:top + side, left:left + side], size, flip)
    return out


def full_frames(photo_names: Sequence[str], size: int) -> torch.Tensor:
    """The largest centred square of each photo resized to size: uint8 N x 3 x size x size."""
    _check_names(photo_names)
    photos = _load_all()
    out = torch.empty(len(photo_names), 3, size, size, dtype=torch.uint8)
    for i, name in enumerate(photo_names):
        photo = photos[name]
        height, width = photo.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        out[i] = _resize(photo[top:top + side, left:left + side], size, flip=False)
    return out


def calibration_and_evaluation(
    size: int, calibration_count: int, evaluation_count: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, evaluation) uint8 crops N x 3 x size x size from disjoint photo sets
    (CALIBRATION_PHOTOS, EVALUATION_PHOTOS), deterministic in `seed`."""
    calibration = crops(CALIBRATION_PHOTOS, calibration_count, size, seed)
    evaluation = crops(EVALUATION_PHOTOS, evaluation_count, size, seed + 1)
    return calibration, evaluation
