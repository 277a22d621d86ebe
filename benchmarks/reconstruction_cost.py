"""Part `reconstruction_cost`: what learned rounding costs next to plain calibration, and
what it buys.

Each model is calibrated twice on the same crops of the scikit-image / scikit-learn photos
(`benchmarks.photos`, 224 x 224 or the model's own size): with `QuantConfig()` and with
`QuantConfig(weight_rounding="learned")`. Each run is its own Python process, so its peak
resident memory (`ru_maxrss`, the model and the data included) is its own. torchvision's
resnet18 and mobilenet_v2 carry random weights here (no weights ship in a wheel): their time
and memory are real, their SQNR only says the method runs; EfficientNet-Lite1 carries its
ImageNet weights. Output SQNR is against float on crops of the held-apart photos.

    python -m benchmarks reconstruction_cost
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time

import torch

from benchmarks.report import PartResult, Table
from benchmarks.training import configure_threads

DESCRIPTION = __doc__.split("\n\n    python")[0].strip()

CALIBRATION_IMAGES, EVALUATION_IMAGES, BATCH = 40, 16, 8
MODELS = ("mobilenet_v2", "resnet18", "lite1")
MODES = {"plain calibration": {}, "learned rounding": {"weight_rounding": "learned"}}


def _model(name: str) -> tuple[torch.nn.Module, int]:
    """The model and its input size."""
    if name == "lite1":
        from benchmarks.efficientnet_lite import LITE_INPUT_SIZE, efficientnet_lite
        return efficientnet_lite(name), LITE_INPUT_SIZE[name]
    import torchvision
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval(), 224


def _images(name: str, size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    from benchmarks.efficientnet_lite import preprocess
    from benchmarks.photos import calibration_and_evaluation
    calibration, evaluation = calibration_and_evaluation(size, CALIBRATION_IMAGES,
                                                         EVALUATION_IMAGES, seed=0)
    return list(preprocess(calibration).split(BATCH)), preprocess(evaluation)


def child(name: str, mode: str) -> dict:
    """One calibration in this process: seconds, peak RSS (MiB) and output SQNR (dB)."""
    import quantfx as qf
    configure_threads()
    model, size = _model(name)
    calibration, evaluation = _images(name, size)
    with torch.no_grad():
        reference = model(evaluation)
    config = qf.QuantConfig(progress=False, **MODES[mode])
    prepared = qf.prepare(model, (calibration[0][:1],), config)
    start = time.perf_counter()
    qf.calibrate(prepared, calibration)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    with torch.no_grad():
        output = qf.convert(prepared)(evaluation)
    noise = float((output - reference).double().pow(2).sum())
    sqnr = 10.0 * math.log10(float(reference.double().pow(2).sum()) / max(noise, 1e-30))
    return {"seconds": seconds, "peak MiB": peak_mib, "output SQNR dB": sqnr}


def _measure(name: str, mode: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.reconstruction_cost", name, mode],
        capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(progress: bool = True) -> PartResult:
    """Time, peak memory and SQNR of plain calibration and of learned rounding per model."""
    table = Table("Learned rounding against plain calibration (same crops, one process each)",
                  ["model", "method", "seconds", "x plain", "peak MiB", "x plain memory",
                   "output SQNR dB"],
                  note=f"{CALIBRATION_IMAGES} calibration crops in batches of {BATCH}, "
                       f"{EVALUATION_IMAGES} evaluation crops of other photos; "
                       "resnet18/mobilenet_v2 with random weights (SQNR not meaningful).")
    configure_threads()  # the machine line of the report: the children use the same
    for name in MODELS:
        plain = None
        for mode in MODES:
            result = _measure(name, mode)
            plain = plain or result
            if progress:
                print(f"  {name} {mode}: {result}", file=sys.stderr, flush=True)
            table.add(model=name, method=mode, seconds=result["seconds"],
                      **{"x plain": result["seconds"] / plain["seconds"],
                         "peak MiB": result["peak MiB"],
                         "x plain memory": result["peak MiB"] / plain["peak MiB"],
                         "output SQNR dB": result["output SQNR dB"]})
    return PartResult("reconstruction_cost", DESCRIPTION, tables=[table])


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], sys.argv[2])))
