"""Bias calibration: the level runner (each node once per depth) vs re-running the graph from
its inputs at every depth (the fallback), on random-init torchvision models.

    python -m benchmarks.bias_calibration_speed [--models densenet121 mobilenet_v2 resnet18]

One thread, 4 batches of 8 images at 64x64, ranges calibrated first without bias calibration.
Prints the seconds of each path, their ratio, and whether the corrected biases are
bit-identical (they must be).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torchvision

import quantfx as qf
from quantfx.ptc.bias_calibration import calibrate_biases


def measure(name: str) -> dict[str, object]:
    """Seconds of both bias-calibration paths on model `name`, and whether they agree."""
    torch.manual_seed(0)
    options = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **options).eval()
    batches = [torch.randn(8, 3, 64, 64) for _ in range(4)]
    prepared = qf.prepare(model, (batches[0],),
                          qf.QuantConfig(bias_calibration=False, progress=False))
    qf.calibrate(prepared, batches)
    seconds, biases = {}, {}
    for label, limit in (("level runner", None), ("re-run per depth", 0)):
        candidate = copy.deepcopy(prepared)
        start = time.perf_counter()
        calibrate_biases(candidate, [(batch,) for batch in batches], progress=False,
                         memory_limit_bytes=limit)
        seconds[label] = time.perf_counter() - start
        biases[label] = {key: value for key, value in candidate.state_dict().items()
                         if key.endswith("bias")}
    identical = all(torch.equal(value, biases["re-run per depth"][key])
                    for key, value in biases["level runner"].items())
    return {"model": name, **{f"{label} s": round(value, 2) for label, value in seconds.items()},
            "speed-up": round(seconds["re-run per depth"] / seconds["level runner"], 1),
            "biases bit-identical": identical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["densenet121", "mobilenet_v2", "resnet18"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        print(measure(name), flush=True)


if __name__ == "__main__":
    main()
