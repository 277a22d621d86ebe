"""Part `detection`: torchvision's detectors quantized in parts (`quantize_only="auto"`).

Each detector (random weights, seed 0, small inputs) is prepared with the largest submodules
that trace as its quantized parts, calibrated by running the *whole* detector on two of
scikit-learn's photographs, converted, and every quantized part exported and checked in ONNX
Runtime's reference kernels. The converted detector's detections on two more images (the
photos mirrored) are matched with the float detector's top 20: same label and IoU > 0.5
(score thresholds at 0, since random weights score every box low).

    python -m benchmarks detection
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torchvision.ops import box_iou

import quantfx as qf
from benchmarks.report import PartResult, Table
from benchmarks.training import configure_threads

DETECTORS = [("ssdlite320_mobilenet_v3_large", 320), ("ssd300_vgg16", 300),
             ("retinanet_resnet50_fpn", 192), ("retinanet_resnet50_fpn_v2", 192),
             ("fcos_resnet50_fpn", 192), ("fasterrcnn_mobilenet_v3_large_fpn", 192),
             ("maskrcnn_resnet50_fpn", 192), ("keypointrcnn_resnet50_fpn", 192)]
TOP = 20

DESCRIPTION = __doc__.split("\n\n    python")[0].strip()


def photos(size: int) -> list[torch.Tensor]:
    """scikit-learn's two sample photographs at `size` x `size`, then both mirrored."""
    from sklearn.datasets import load_sample_images

    images = [torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255.0
              for image in load_sample_images().images]
    images = [torch.nn.functional.interpolate(image[None], size=(size, size), mode="bilinear",
                                              align_corners=False)[0] for image in images]
    return images + [image.flip(-1) for image in images]


def match(reference: dict, detections: dict) -> tuple[float, float, float]:
    """(share of the float top-TOP detections matched, their mean IoU, mean |score change|)."""
    keep = reference["scores"].argsort(descending=True)[:TOP]
    boxes, labels, scores = (reference[key][keep] for key in ("boxes", "labels", "scores"))
    if len(boxes) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(detections["boxes"]) == 0:
        return 0.0, float("nan"), float("nan")
    overlap = box_iou(boxes, detections["boxes"])
    overlap[labels[:, None] != detections["labels"][None, :]] = 0.0
    best, index = overlap.max(dim=1)
    matched = best > 0.5
    if not bool(matched.any()):
        return 0.0, float("nan"), float("nan")
    score_change = (scores[matched] - detections["scores"][index[matched]]).abs().mean()
    return float(matched.float().mean()), float(best[matched].mean()), float(score_change)


THRESHOLDS = {"fasterrcnn": "box_score_thresh", "maskrcnn": "box_score_thresh",
              "keypointrcnn": "box_score_thresh"}
"""The score-threshold option of each family (lowered to 0: random weights score low)."""


def measure(name: str, size: int) -> dict[str, object]:
    """One row: parts, timing, export agreement and detection agreement of detector `name`."""
    options = {} if name.startswith("ssd") else {"min_size": size, "max_size": size}
    options[THRESHOLDS.get(name.split("_")[0], "score_thresh")] = 0.0
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                         **options).eval()
    images = photos(size)
    row: dict[str, object] = {"model": name, "input": f"{size}x{size}"}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = qf.prepare(model, ([images[0]],), qf.QuantConfig(quantize_only="auto",
                                                                    progress=False))
    row["prepare s"] = time.perf_counter() - start
    described = qf.parts_of(prepared)
    parts = [part for part, text in described.items() if text.startswith("quantized")]
    row["parts quantized"] = len(parts)
    row["float modules"] = ", ".join(part for part, text in described.items()
                                     if text.startswith("float"))[:120]
    start = time.perf_counter()
    qf.calibrate(prepared, [([images[0]],), ([images[1]],)])
    row["calibrate s"] = time.perf_counter() - start
    converted = qf.convert(prepared)
    identical = 0
    with tempfile.TemporaryDirectory(prefix="quantfx-det-") as folder:
        for index, part in enumerate(parts):
            try:
                report = qf.export_onnx(converted, ([images[2]],), Path(folder) / f"{index}.onnx",
                                        part=part)
                identical += report.fraction_identical == 1.0
            except qf.ExportError as error:
                row.setdefault("note", f"{part}: {str(error).splitlines()[0][:100]}")
    row["parts bit-exact in ORT"] = f"{identical}/{len(parts)}"
    matched, iou, score = [], [], []
    with torch.no_grad():
        for image in images[2:]:
            share, overlap, change = match(model([image])[0], converted([image])[0])
            matched.append(share)
            iou.append(overlap)
            score.append(change)
    row["top-20 matched %"] = 100.0 * sum(matched) / len(matched)
    row["mean IoU"] = sum(iou) / len(iou)
    row["mean score change"] = sum(score) / len(score)
    return row


def run(progress: bool = True) -> PartResult:
    """Every detector of `DETECTORS`."""
    threads = configure_threads()
    columns = ["model", "input", "parts quantized", "float modules", "prepare s", "calibrate s",
               "parts bit-exact in ORT", "top-20 matched %", "mean IoU", "mean score change",
               "note"]
    table = Table("torchvision detectors, quantized in parts", columns,
                  note=f"torch threads: {threads}; random weights (seed 0). Matched: a float "
                       f"top-{TOP} detection with a converted detection of the same label at "
                       "IoU > 0.5; IoU and score change over the matched ones.")
    for name, size in DETECTORS:
        try:
            row = measure(name, size)
        except Exception as error:  # noqa: BLE001 - a failing model is a result
            row = {"model": name, "note": f"FAILED: {type(error).__name__}: {error}"[:200]}
        table.add(**row)
        print(f"[detection] {row}", flush=True)
    return PartResult("detection", DESCRIPTION, [table])


if __name__ == "__main__":
    from benchmarks.__main__ import main

    main(["detection"])
