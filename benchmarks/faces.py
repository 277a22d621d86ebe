"""A real pretrained detector on real photos: facenet-pytorch's MTCNN cascade (P-, R- and
O-Net, Conv + PReLU + Linear, no BatchNorm; weights inside the wheel, MIT) with its float
pipeline (image pyramid, NMS, box regression), each net replaced by its quantized self.

Scenes: the faces of scikit-image's `lfw_subset` (25 x 25 grayscale, upscaled to 48-96 px)
pasted with a few of its non-face patches into scikit-image / scikit-learn photos
(`benchmarks.photos`), plus whole photos with real faces (astronaut, camera). Calibration
scenes use the calibration photos and the first half of the faces; evaluation scenes the
evaluation photos and the other half. Each net is calibrated on what it receives when the
*float* cascade runs on the calibration scenes (the pyramid levels for P-Net, the candidate
crops for R- and O-Net), as a user would record it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from benchmarks.photos import CALIBRATION_PHOTOS, EVALUATION_PHOTOS, load_photos

__all__ = ["NETS", "Scene", "calibration_and_evaluation_scenes", "detect", "float_cascade",
           "match", "quantize_cascade", "record_inputs"]

NETS = ("pnet", "rnet", "onet")
FACES, NON_FACES = range(0, 100), range(100, 200)
"""lfw_subset holds 100 faces, then 100 non-face patches."""
GRID, CANVAS = 3, 320
"""Each scene is a 3 x 3 grid of cells over a 320 x 320 resize of one photo."""
FACES_PER_SCENE, NON_FACES_PER_SCENE = 6, 2
IOU = 0.5
"""A quantized detection matches a float one when their boxes overlap by more than this."""
CROP_SAMPLES = 512
"""At most this many R-Net / O-Net calibration crops (P-Net takes every pyramid level)."""


@dataclass
class Scene:
    """One image (H, W, 3 float tensor, 0..255) and the boxes of the faces pasted into it."""

    image: torch.Tensor
    faces: list[tuple[int, int, int, int]]


def float_cascade() -> nn.Module:
    """facenet-pytorch's MTCNN with its pretrained P/R/O-Nets, every detection kept, on CPU."""
    from facenet_pytorch import MTCNN

    return MTCNN(keep_all=True, device="cpu").eval()


def _scene(photo: np.ndarray, patches: np.ndarray, face_count: int, seed: int) -> Scene:
    """`patches` (faces first, `face_count` of them) pasted into a 3 x 3 grid over `photo`."""
    generator = torch.Generator().manual_seed(seed)
    background = torch.from_numpy(np.array(photo)).float().permute(2, 0, 1)[None]
    canvas = F.interpolate(background, size=(CANVAS, CANVAS), mode="bilinear",
                           align_corners=False)[0]
    cell = CANVAS // GRID
    order = torch.randperm(GRID * GRID, generator=generator)[:len(patches)].tolist()
    faces = []
    for index, (patch, place) in enumerate(zip(patches, order)):
        side = int(torch.randint(48, cell - 8, (1,), generator=generator))
        row, column = divmod(place, GRID)
        top = row * cell + int(torch.randint(0, cell - side, (1,), generator=generator))
        left = column * cell + int(torch.randint(0, cell - side, (1,), generator=generator))
        resized = F.interpolate(torch.from_numpy(patch).float()[None, None], size=(side, side),
                                mode="bilinear", align_corners=False)[0] * 255.0
        canvas[:, top:top + side, left:left + side] = resized.clamp(0, 255).expand(3, -1, -1)
        if index < face_count:
            faces.append((left, top, left + side, top + side))
    return Scene(canvas.permute(1, 2, 0).contiguous(), faces)


def _scenes(photo_names: Sequence[str], faces: Sequence[int], non_faces: Sequence[int],
            count: int, seed: int) -> list[Scene]:
    from skimage import data

    patches = data.lfw_subset()
    photos = load_photos()
    scenes = []
    for index in range(count):
        face_ids = [faces[(index * FACES_PER_SCENE + k) % len(faces)]
                    for k in range(FACES_PER_SCENE)]
        other_ids = [non_faces[(index * NON_FACES_PER_SCENE + k) % len(non_faces)]
                     for k in range(NON_FACES_PER_SCENE)]
        scenes.append(_scene(photos[photo_names[index % len(photo_names)]],
                             patches[face_ids + other_ids], len(face_ids), seed + index))
    return scenes


def calibration_and_evaluation_scenes(calibration: int, evaluation: int
                                      ) -> tuple[list[Scene], list[Scene]]:
    """Disjoint scenes: other photos and other faces for evaluation than for calibration; the
    whole camera photo (a real face) calibrates, the astronaut evaluates."""
    photos = load_photos()
    half = len(FACES) // 2
    calibrating = _scenes([name for name in CALIBRATION_PHOTOS if name != "camera"],
                          FACES[:half], NON_FACES[:half], calibration, seed=0)
    evaluating = _scenes(EVALUATION_PHOTOS, FACES[half:], NON_FACES[half:], evaluation,
                         seed=1000)
    calibrating.append(Scene(torch.from_numpy(np.array(photos["camera"])).float(), []))
    evaluating.append(Scene(torch.from_numpy(np.array(photos["astronaut"])).float(), []))
    return calibrating, evaluating


class _Recorder(nn.Module):
    """A net that keeps every input it is given (the cascade reads its parameters' dtype)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.inputs.append(x.detach().clone())
        return self.net(x)


def detect(cascade: nn.Module, scenes: Sequence[Scene]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes (n, 4), scores (n,)) of `cascade` on each scene."""
    found = []
    with torch.no_grad():
        for scene in scenes:
            boxes, scores = cascade.detect(scene.image)
            if boxes is None:
                boxes, scores = np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
            found.append((np.asarray(boxes, np.float64), np.asarray(scores, np.float64)))
    return found


def record_inputs(cascade: nn.Module, scenes: Sequence[Scene]) -> dict[str, list[torch.Tensor]]:
    """What each net receives while the float cascade runs on `scenes`: every P-Net pyramid
    level (one batch each, sizes differ) and R-/O-Net crops in batches of 64 (at most
    `CROP_SAMPLES`)."""
    recording = copy.deepcopy(cascade)
    for name in NETS:
        setattr(recording, name, _Recorder(getattr(recording, name)))
    detect(recording, scenes)
    batches = {"pnet": recording.pnet.inputs}
    for name in ("rnet", "onet"):
        crops = torch.cat(getattr(recording, name).inputs)[:CROP_SAMPLES]
        batches[name] = list(crops.split(64))
    return batches


class _Float32(nn.Module):
    """A net without float parameters (torch.ao's packed ones are not), given one: the cascade
    reads the dtype of its nets' first parameter."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.dtype_marker = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.net(x)


def quantize_cascade(cascade: nn.Module, inputs: dict[str, list[torch.Tensor]],
                     quantize: Callable[[nn.Module, list[torch.Tensor]], nn.Module]
                     ) -> nn.Module:
    """A copy of `cascade` whose nets are `quantize(net, calibration batches)`."""
    quantized = copy.deepcopy(cascade)
    for name in NETS:
        net = quantize(getattr(cascade, name), inputs[name])
        setattr(quantized, name, net if any(True for _ in net.parameters()) else _Float32(net))
    return quantized


def match(reference: Sequence[tuple[np.ndarray, np.ndarray]],
          candidate: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Greedy matching of `candidate`'s detections to `reference`'s (highest float score first,
    IoU > `IOU`): the share of reference detections matched (%), the mean IoU and the mean
    absolute score change of the matched pairs (None where nothing matched), and how many
    candidate detections match none."""
    total = matched = extra = 0
    ious, score_changes = [], []
    for (ref_boxes, ref_scores), (boxes, scores) in zip(reference, candidate):
        free = np.ones(len(boxes), bool)
        for index in np.argsort(-ref_scores):
            total += 1
            if not free.any():
                continue
            overlaps = np.where(free, box_iou(torch.from_numpy(ref_boxes[index:index + 1]),
                                              torch.from_numpy(boxes))[0].numpy(), -1.0)
            best = int(np.argmax(overlaps))
            if overlaps[best] > IOU:
                free[best] = False
                matched += 1
                ious.append(overlaps[best])
                score_changes.append(abs(scores[best] - ref_scores[index]))
        extra += int(free.sum())
    return {"float detections": total,
            "matched %": 100.0 * matched / total if total else None,
            "mean IoU": float(np.mean(ious)) if ious else None,
            "mean score change": float(np.mean(score_changes)) if score_changes else None,
            "extra detections": extra}
