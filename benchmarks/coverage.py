"""Part `coverage`: which torchvision classification and segmentation models quantfx handles.

Every builder of `torchvision.models` and `torchvision.models.segmentation`, random weights, a
small input (64x64, or 224x224 when the model needs it): does it prepare (trace), calibrate,
convert, how close is the converted model to float (SQNR), and does quantfx's ONNX export run and
match in ONNX Runtime. Each model runs in a worker process with a time limit, so one model that
hangs or crashes costs only itself; results are cached per model, keyed by the quantfx source.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.report import PartResult, Table
from benchmarks.training import CACHE_DIR

PARAMETER_LIMIT_M = 30.0
"""Models above this many million parameters are skipped (init + export would blow the budget)."""
MODEL_TIMEOUT_S = 150
INPUT_SIZES = (64, 224)
CALIBRATION_BATCHES = 2
BATCH = 2

DESCRIPTION = (
    "Every torchvision classification and segmentation builder, random weights (seed 0), batch "
    f"{BATCH}, input 3x64x64 (3x224x224 where the model rejects 64). A stage shows 'ok' or the "
    "exception type and the first line of its message. 'SQNR dB' compares the converted model's "
    "output with the float model's on a calibration batch (random weights, so only a sanity "
    "check: higher is closer). 'ORT identical %' is the share of output elements of quantfx's "
    "exported ONNX that ONNX Runtime computes bit-identical to the converted model, 'max LSB' "
    f"the largest difference. Models over {PARAMETER_LIMIT_M:.0f} M parameters are skipped for "
    f"time; each model has a {MODEL_TIMEOUT_S} s limit."
)

STAGES = ("float", "prepare", "calibrate", "convert", "export")


def model_names() -> list[tuple[str, str]]:
    """(task, builder name) of every torchvision classification and segmentation model."""
    import torchvision

    names = [("classification", name)
             for name in torchvision.models.list_models(module=torchvision.models)]
    names += [("segmentation", name)
              for name in torchvision.models.list_models(module=torchvision.models.segmentation)]
    return names


def _first_tensor(output: Any) -> Any:
    """The main tensor of a model output (segmentation models return {'out': ..., 'aux': ...})."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return _first_tensor(output.get("out", next(iter(output.values()))))
    if isinstance(output, (tuple, list)):
        return _first_tensor(output[0])
    raise TypeError(f"unexpected model output {type(output).__name__}")


def build(name: str) -> Any:
    """Torchvision model `name` with random weights; never downloads (no backbone weights)."""
    import torchvision

    options = {"weights": None}
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        options["weights_backbone"] = None
    return torchvision.models.get_model(name, **options)


def parameter_count(name: str) -> int | None:
    """Parameters of model `name` without building it: from its weights' metadata, else meta."""
    import torch
    import torchvision

    try:
        return int(next(iter(torchvision.models.get_model_weights(name))).meta["num_params"])
    except Exception:  # noqa: BLE001 - no weights enum or no metadata: count on the meta device
        pass
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in build(name).parameters())
    except Exception:  # noqa: BLE001 - some builders cannot run on meta
        return None


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def check_model(name: str) -> dict[str, Any]:
    """Run every stage on torchvision model `name`; the row of the coverage table."""
    import torch

    import quantfx as qf

    torch.set_num_threads(1)
    row: dict[str, Any] = {"model": name}
    start = time.perf_counter()
    parameters = parameter_count(name)
    if parameters is not None:
        row["parameters (M)"] = parameters / 1e6
        if parameters / 1e6 > PARAMETER_LIMIT_M:
            row["float"] = f"skipped ({parameters / 1e6:.0f} M parameters)"
            return row
    torch.manual_seed(0)
    model = build(name).eval()
    row["parameters (M)"] = sum(p.numel() for p in model.parameters()) / 1e6
    images = None
    float_output = None
    errors = []
    for size in INPUT_SIZES:
        candidate = torch.randn(BATCH, 3, size, size)
        try:
            with torch.no_grad():
                float_output = _first_tensor(model(candidate))
            images, row["input"] = candidate, f"{size}x{size}"
            break
        except Exception as error:  # noqa: BLE001
            errors.append(_describe(error))
    if images is None:
        row["float"] = errors[-1]
        return row
    row["float"] = "ok"
    example = (images,)
    stage = "prepare"
    try:
        prepared = qf.prepare(model, example, qf.QuantConfig(progress=False))
        row[stage] = "ok"
        stage = "calibrate"
        calibration = [torch.randn(BATCH, *images.shape[1:]) for _ in range(CALIBRATION_BATCHES)]
        qf.calibrate(prepared, [images, *calibration])
        row[stage] = "ok"
        stage = "convert"
        converted = qf.convert(prepared)
        with torch.no_grad():
            quantized_output = _first_tensor(converted(images))
        noise = (quantized_output - float_output).pow(2).mean()
        signal = float_output.pow(2).mean()
        row["SQNR dB"] = float(10 * torch.log10(signal / noise.clamp_min(1e-30)))
        row[stage] = "ok"
        if hasattr(qf, "export_onnx"):
            stage = "export"
            with tempfile.TemporaryDirectory(prefix="quantfx-coverage-") as folder:
                report = qf.export_onnx(converted, example, Path(folder) / f"{name}.onnx")
            row[stage] = "ok"
            if getattr(report, "fraction_identical", None) is not None:
                row["ORT identical %"] = 100.0 * report.fraction_identical
            if getattr(report, "max_lsb_diff", None) is not None:
                row["max LSB"] = float(report.max_lsb_diff)
    except Exception as error:  # noqa: BLE001 - the failure is the result
        row[stage] = _describe(error)
        row["traceback"] = traceback.format_exc(limit=-4)
    row["seconds"] = time.perf_counter() - start
    return row


def _worker(connection: Any) -> None:
    """Worker process loop: receive model names, send back rows, until told to stop."""
    while True:
        name = connection.recv()
        if name is None:
            return
        try:
            row = check_model(name)
        except BaseException as error:  # noqa: BLE001 - report, do not die
            row = {"model": name, "float": _describe(error)}
        connection.send(row)


class _Worker:
    """One worker process; restarted after a timeout or a crash."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child,), daemon=True)
        self.process.start()

    def check(self, name: str, timeout: float) -> dict[str, Any] | None:
        """The row of `name`, or None when the worker died or ran out of time."""
        self.connection.send(name)
        if self.connection.poll(timeout):
            try:
                return self.connection.recv()
            except EOFError:
                return None
        return None

    def stop(self, force: bool = False) -> None:
        if force or not self.process.is_alive():
            self.process.kill()
        else:
            self.connection.send(None)
        self.process.join(10)


def _source_key() -> str:
    """Hash of quantfx's source, the checking code and the torch/torchvision versions."""
    import torch
    import torchvision

    import quantfx

    digest = hashlib.sha256()
    package = Path(quantfx.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    for function in (check_model, build, parameter_count, _first_tensor, _describe):
        digest.update(inspect.getsource(function).encode())
    digest.update(repr((PARAMETER_LIMIT_M, INPUT_SIZES, CALIBRATION_BATCHES, BATCH)).encode())
    digest.update(f"{torch.__version__} {torchvision.__version__}".encode())
    return digest.hexdigest()[:16]


def run(progress: bool = True) -> PartResult:
    """Check every model (cached by quantfx source hash), one row each."""
    from tqdm.auto import tqdm

    cache_path = CACHE_DIR / f"coverage-{_source_key()}.json"
    cached: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    columns = ["task", "model", "parameters (M)", "input", *STAGES, "SQNR dB",
               "ORT identical %", "max LSB", "seconds"]
    table = Table("Model coverage", columns)
    worker: _Worker | None = None
    names = model_names()
    # Smallest models first: if the budget runs out, the most models are done.
    order = sorted(names, key=lambda item: parameter_count(item[1]) or 0)
    try:
        for _, name in tqdm(order, desc="coverage", unit="model",
                            disable=None if progress else True):
            if name not in cached:
                worker = worker or _Worker()
                row = worker.check(name, MODEL_TIMEOUT_S)
                if row is None:
                    reason = ("worker crashed" if not worker.process.is_alive()
                              else f"timed out after {MODEL_TIMEOUT_S} s")
                    row = {"model": name, "float": reason}
                    worker.stop(force=True)
                    worker = None
                cached[name] = row
                CACHE_DIR.mkdir(parents=True, exist_ok=True)
                cache_path.write_text(json.dumps(cached, indent=1))
    finally:
        if worker is not None:
            worker.stop()
    for task, name in names:
        table.add(task=task, **{key: value for key, value in cached[name].items()
                                if key != "traceback"})
    summary = Table("Coverage summary", ["task", "models", *STAGES])
    for task in ("classification", "segmentation"):
        rows = [row for row in table.rows if row["task"] == task]
        counts = {stage: sum(row.get(stage) == "ok" for row in rows) for stage in STAGES}
        summary.add(task=task, models=len(rows), **counts)
    tracebacks = Table("Failure tracebacks (last frames)", ["model", "traceback"])
    for _, name in names:
        if cached.get(name, {}).get("traceback"):
            tracebacks.add(model=name, traceback=cached[name]["traceback"][-600:])
    print(f"[coverage] cache: {cache_path}", file=sys.stderr)
    return PartResult("coverage", DESCRIPTION, [summary, table, tracebacks])


if __name__ == "__main__":  # one model, for debugging: python -m benchmarks.coverage resnet18
    print(json.dumps(check_model(sys.argv[1]), indent=1, default=str))
    os._exit(0)
