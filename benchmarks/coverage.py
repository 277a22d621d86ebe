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
import multiprocessing.connection
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.report import PartResult, Table
from benchmarks.training import CACHE_DIR

WORKERS = 2
"""Models checked at once, one thread each (this machine has 2 cores)."""
ALONE_ABOVE_M = 250.0
"""Models above this many million parameters run alone (memory), on WORKERS threads."""
BASE_TIMEOUT_S = 180
TIMEOUT_S_PER_M = 1.5
"""A model's time limit: BASE_TIMEOUT_S plus TIMEOUT_S_PER_M per million parameters."""
INPUT_SIZES = (64, 224)
CALIBRATION_BATCHES = 2
BATCH = 2

DESCRIPTION = (
    "Every torchvision classification and segmentation builder, random weights (seed 0; "
    f"zero-initialized heads get N(0, 0.02)), batch {BATCH}, input 3x64x64, or 3x224x224 where "
    "the model rejects 64 or an adaptive pool would upsample (VGG, AlexNet, ViT). A stage shows "
    "'ok' or the exception type and the first line of its message; the failure tracebacks follow "
    "the table. 'SQNR dB' compares the converted model's output with the float model's on a "
    "calibration batch (random weights, so only a sanity check: higher is closer). 'ORT "
    "identical %' is the share of output elements of quantfx's exported ONNX that ONNX Runtime "
    "computes bit-identical to the converted model, 'max LSB' the largest difference (export "
    "fails above 1 LSB: nothing is written); 'offloaded tda4vm / am68a' are the nodes TIDL's "
    "rules for that device would run on the accelerator, out of all non-Q/DQ nodes "
    "(quantfx.check_tidl of the exported file); 'ORT bit-identical' in the summary counts the "
    "models at 100 %. Each model runs in its own process with a limit of "
    f"{BASE_TIMEOUT_S} s + {TIMEOUT_S_PER_M} s per million parameters; 'seconds' is its wall "
    f"time, with {WORKERS} models checked at once (those over {ALONE_ABOVE_M:.0f} M parameters "
    f"alone, on {WORKERS} threads)."
)

STAGES = ("float", "prepare", "calibrate", "convert", "export")
OFFLOAD_TARGETS = ("tda4vm", "am68a")
"""Devices whose TIDL rules the exported file is checked against (nodes offloaded / total)."""


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


def _run_float(model: Any, images: Any) -> tuple[Any, bool]:
    """(main output, whether an adaptive pool mapped a smaller map to a larger one). Such a
    pool (VGG's 7x7 and AlexNet's 6x6 at 64x64) is no whole-window pooling: the input is too
    small for the model as designed, and ONNX has no such pool."""
    import torch
    from torch import nn

    upsampling = []

    def hook(module: Any, inputs: Any, output: Any) -> None:
        upsampling.append(any(o > i for i, o in zip(inputs[0].shape[2:], output.shape[2:])))

    handles = [module.register_forward_hook(hook) for module in model.modules()
               if isinstance(module, (nn.modules.pooling._AdaptiveAvgPoolNd,
                                      nn.modules.pooling._AdaptiveMaxPoolNd))]
    try:
        with torch.no_grad():
            return _first_tensor(model(images)), any(upsampling)
    finally:
        for handle in handles:
            handle.remove()


def _choose_input(model: Any) -> tuple[Any, Any, str | None]:
    """(images, float output, "HxW") at the smallest of INPUT_SIZES the model runs at as
    designed; (None, reason, None) when it runs at none."""
    import torch

    errors, fallback = [], None
    for size in INPUT_SIZES:
        candidate = torch.randn(BATCH, 3, size, size)
        try:
            output, upsamples = _run_float(model, candidate)
        except Exception as error:  # noqa: BLE001
            errors.append(_describe(error))
            continue
        if not upsamples:
            return candidate, output, f"{size}x{size}"
        fallback = fallback or (candidate, output, f"{size}x{size}")
    return fallback or (None, errors[-1], None)


def _reinitialize_zero_layers(model: Any) -> None:
    """Give zero-initialized weights (torchvision's ViT heads) small random values, so the
    float output is not all zeros and the SQNR compares something."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and weight.dim() >= 2 and not weight.any():
                torch.nn.init.normal_(weight, std=0.02)


def _offload(row: dict[str, Any], converted: Any, example: Any, path: Path) -> None:
    """Nodes offloaded / total under each of OFFLOAD_TARGETS' TIDL rules (the operator rules
    that decide offloading depend on the graph, not on the profile the file was made with)."""
    import quantfx as qf

    try:
        if not path.exists():
            qf.export_onnx(converted, example, path, verify=False)
        for target in OFFLOAD_TARGETS:
            tidl = qf.check_tidl(path, target)
            row[f"offloaded {target}"] = f"{tidl.offloaded}/{tidl.total}"
    except Exception:  # noqa: BLE001 - a model that does not export has no file to check
        pass


def check_model(name: str, threads: int = 1) -> dict[str, Any]:
    """Run every stage on torchvision model `name`; the row of the coverage table."""
    import torch

    import quantfx as qf

    torch.set_num_threads(threads)
    row: dict[str, Any] = {"model": name}
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build(name).eval()
    _reinitialize_zero_layers(model)
    row["parameters (M)"] = sum(p.numel() for p in model.parameters()) / 1e6
    images, float_output, row["input"] = _choose_input(model)
    if images is None:
        row["float"] = float_output
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
                path = Path(folder) / f"{name}.onnx"
                try:
                    report = qf.export_onnx(converted, example, path, threads=threads)
                finally:  # a file refused by verification is checked for TIDL all the same
                    _offload(row, converted, example, path)
            row[stage] = "ok"
            if getattr(report, "fraction_identical", None) is not None:
                row["ORT identical %"] = 100.0 * report.fraction_identical
            if getattr(report, "max_lsb_diff", None) is not None:
                row["max LSB"] = float(report.max_lsb_diff)
    except Exception as error:  # noqa: BLE001 - the failure is the result
        row[stage] = _describe(error)
        report = getattr(error, "report", None)  # a failed verification keeps its figures
        if report is not None and report.fraction_identical is not None:
            row["ORT identical %"] = 100.0 * report.fraction_identical
            row["max LSB"] = float(report.max_lsb_diff)
        row["traceback"] = traceback.format_exc(limit=-4)
    row["seconds"] = time.perf_counter() - start
    return row


def _worker(connection: Any) -> None:
    """Worker process loop: receive model names, send back rows, until told to stop."""
    while True:
        task = connection.recv()
        if task is None:
            return
        name, threads = task
        try:
            row = check_model(name, threads)
        except BaseException as error:  # noqa: BLE001 - report, do not die
            row = {"model": name, "float": _describe(error)}
        connection.send(row)


class _Worker:
    """One worker process checking one model at a time; replaced after a timeout or a crash."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child,), daemon=True)
        self.process.start()
        self.name: str | None = None
        self.deadline = 0.0
        self.limit = 0.0

    def start(self, name: str, limit: float, threads: int) -> None:
        self.name, self.limit = name, limit
        self.deadline = time.monotonic() + limit
        self.connection.send((name, threads))

    def result(self) -> dict[str, Any] | None:
        """The finished row, or None while there is none (see `failure`)."""
        if self.connection.poll():
            try:
                return self.connection.recv()
            except EOFError:
                pass
        return None

    def failure(self) -> str | None:
        """Why the running check cannot finish, or None while it still may."""
        if not self.process.is_alive():
            return "worker crashed (out of memory?)"
        if time.monotonic() > self.deadline:
            return f"timed out after {self.limit:.0f} s"
        return None

    def stop(self, force: bool = False) -> None:
        if force or not self.process.is_alive():
            self.process.kill()
        else:
            self.connection.send(None)
        self.process.join(10)


def _time_limit(parameters: int | None) -> float:
    return BASE_TIMEOUT_S + TIMEOUT_S_PER_M * (parameters or 0) / 1e6


def _check_all(names: list[str], sizes: dict[str, int | None], cached: dict[str, Any],
               save: Any, bar: Any) -> None:
    """Check `names` (smallest first) on WORKERS processes; a model above ALONE_ABOVE_M runs
    alone. Each finished row goes into `cached` and is saved at once."""
    queue = list(names)
    idle = [_Worker() for _ in range(min(WORKERS, len(queue)))]
    busy: list[_Worker] = []
    try:
        while queue or busy:
            while queue and idle:
                alone = [(sizes[name] or 0) / 1e6 > ALONE_ABOVE_M
                         for name in [queue[0], *(worker.name for worker in busy)]]
                if busy and any(alone):
                    break  # a big model runs (or is next): let it have the machine
                name = queue.pop(0)
                big = (sizes[name] or 0) / 1e6 > ALONE_ABOVE_M
                if big:  # idle workers keep the memory of their last model: start afresh
                    for worker in idle:
                        worker.stop()
                    idle = [_Worker()]
                worker = idle.pop()
                worker.start(name, _time_limit(sizes[name]), WORKERS if big else 1)
                busy.append(worker)
            multiprocessing.connection.wait([worker.connection for worker in busy]
                                            + [worker.process.sentinel for worker in busy],
                                            timeout=1.0)
            for worker in list(busy):
                row = worker.result()
                if row is None:
                    reason = worker.failure()
                    if reason is None:
                        continue
                    row = {"model": worker.name, "float": reason}
                    worker.stop(force=True)
                    busy.remove(worker)
                    while len(idle) + len(busy) < WORKERS:
                        idle.append(_Worker())
                else:
                    busy.remove(worker)
                    if (sizes[worker.name] or 0) / 1e6 > ALONE_ABOVE_M:
                        worker.stop()  # it holds a big model's memory: replace it
                        worker = _Worker()
                    idle.append(worker)
                    while len(idle) + len(busy) < WORKERS:
                        idle.append(_Worker())
                cached[row["model"]] = row
                save()
                bar.update(1)
    finally:
        for worker in idle + busy:
            worker.stop(force=worker in busy)


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
    for function in (check_model, build, parameter_count, _first_tensor, _describe,
                     _choose_input, _run_float, _reinitialize_zero_layers, _check_all):
        digest.update(inspect.getsource(function).encode())
    digest.update(repr((INPUT_SIZES, CALIBRATION_BATCHES, BATCH, WORKERS, ALONE_ABOVE_M,
                        BASE_TIMEOUT_S, TIMEOUT_S_PER_M)).encode())
    digest.update(f"{torch.__version__} {torchvision.__version__}".encode())
    return digest.hexdigest()[:16]


def run(progress: bool = True) -> PartResult:
    """Check every model (cached by quantfx source hash), one row each."""
    from tqdm.auto import tqdm

    cache_path = CACHE_DIR / f"coverage-{_source_key()}.json"
    cached: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    columns = ["task", "model", "parameters (M)", "input", *STAGES, "SQNR dB",
               "ORT identical %", "max LSB",
               *(f"offloaded {target}" for target in OFFLOAD_TARGETS), "seconds"]
    table = Table("Model coverage", columns)
    names = model_names()
    sizes = {name: parameter_count(name) for _, name in names}
    # Smallest models first: if the budget runs out, the most models are done.
    order = sorted((name for _, name in names), key=lambda name: sizes[name] or 0)
    todo = [name for name in order if name not in cached]

    def save() -> None:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        temporary = cache_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(cached, indent=1))
        temporary.replace(cache_path)

    with tqdm(total=len(names), initial=len(names) - len(todo), desc="coverage", unit="model",
              disable=None if progress else True) as bar:
        if todo:
            _check_all(todo, sizes, cached, save, bar)
    for task, name in names:
        table.add(task=task, **{key: value for key, value in cached[name].items()
                                if key != "traceback"})
    summary = Table("Coverage summary", ["task", "models", *STAGES, "ORT bit-identical"])
    for task in ("classification", "segmentation"):
        rows = [row for row in table.rows if row["task"] == task]
        counts = {stage: sum(row.get(stage) == "ok" for row in rows) for stage in STAGES}
        identical = sum(row.get("ORT identical %") == 100.0 for row in rows)
        summary.add(task=task, models=len(rows), **counts, **{"ORT bit-identical": identical})
    tracebacks = Table("Failure tracebacks (last frames)", ["model", "traceback"])
    for _, name in names:
        if cached.get(name, {}).get("traceback"):
            tracebacks.add(model=name, traceback=cached[name]["traceback"][-600:])
    print(f"[coverage] cache: {cache_path}", file=sys.stderr)
    return PartResult("coverage", DESCRIPTION, [summary, table, tracebacks])


if __name__ == "__main__":  # one model, for debugging: python -m benchmarks.coverage resnet18
    print(json.dumps(check_model(sys.argv[1]), indent=1, default=str))
    os._exit(0)
