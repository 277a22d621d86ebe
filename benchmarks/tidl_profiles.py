"""Part `tidl_profiles`: what each device profile costs and what TIDL would run, per model.

For the 12 torchvision models of the test suite (random weights, randomized BatchNorm
statistics, 3x64x64, calibrated on 4 random batches of 4): the converted model's SQNR against
float with the default profile ("generic"), with generic but per-tensor depthwise weights (so only
the 16-bit bias fit separates it from the next column), with the whole "tda4vm" profile and
with "am68a"; the largest bias code under "tda4vm" (must stay within
int16); and the TIDL checker's nodes offloaded / total for "tda4vm" and "am68a".

    python -m benchmarks tidl_profiles
"""

from __future__ import annotations

import os
import tempfile
import warnings

import torch

import quantfx as qf
from benchmarks.behaviour_hash import TORCHVISION_MODELS as MODELS
from benchmarks.behaviour_hash import build
from benchmarks.report import PartResult, Table
from benchmarks.training import configure_threads
from quantfx.layers import IntegerLayer

DESCRIPTION = __doc__.split("\n\n")[1].replace("\n", " ")
def measure(name: str) -> dict[str, object]:
    model, _ = build(name)
    generator = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 3, 64, 64, generator=generator) for _ in range(4)]
    test = torch.randn(4, 3, 64, 64, generator=generator)
    with torch.no_grad():
        reference = model(test)
    row: dict[str, object] = {"model": name}
    for variant in ("generic", "tda4vm", "am68a"):
        prepared = qf.prepare(model, data[0][:1], qf.QuantConfig(target=variant,
                                                                 progress=False))
        qf.calibrate(prepared, data)
        converted = qf.convert(prepared)
        with torch.no_grad():
            row[f"SQNR {variant} dB"] = qf.qmath.sqnr_db(reference, converted(test))
        if variant == "tda4vm":
            row["max |bias code| tda4vm"] = max(
                int(layer.bias_int.abs().max()) for layer in converted.modules()
                if isinstance(layer, IntegerLayer) and layer.bias_int is not None)
        if variant != "generic":
            with tempfile.TemporaryDirectory() as folder:
                report = qf.export_onnx(converted, test[:1], os.path.join(folder, "m.onnx"),
                                        verify=False)
            row[f"offloaded {variant}"] = f"{report.tidl.offloaded}/{report.tidl.total}"
    generic_per_tensor = qf.prepare(model, data[0][:1], qf.QuantConfig(
        per_channel_depthwise=False, progress=False))
    qf.calibrate(generic_per_tensor, data)
    with torch.no_grad():
        per_tensor = qf.qmath.sqnr_db(reference, qf.convert(generic_per_tensor)(test))
    row["SQNR generic, per-tensor depthwise dB"] = per_tensor
    row["16-bit bias cost dB"] = per_tensor - float(row["SQNR tda4vm dB"])
    return row


def run(progress: bool = True) -> PartResult:
    threads = configure_threads()
    table = Table(
        "Device profiles: SQNR against float, bias range, TIDL offload",
        ["model", "SQNR generic dB", "SQNR generic, per-tensor depthwise dB", "SQNR tda4vm dB",
         "16-bit bias cost dB", "SQNR am68a dB", "max |bias code| tda4vm", "offloaded tda4vm",
         "offloaded am68a"],
        note=f"torch threads: {threads}. 'tda4vm' differs from 'generic' in per-tensor "
             "depthwise weights and 16-bit biases; '16-bit bias cost' compares it with "
             "generic + per-tensor depthwise, so it is the bias fit alone (int16 max: 32767). "
             "'offloaded': nodes the TIDL checker says run on the accelerator / all non-Q/DQ "
             "nodes.",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODELS:
            table.add(**measure(name))
    return PartResult("tidl_profiles", DESCRIPTION, tables=[table])


if __name__ == "__main__":
    from benchmarks.report import markdown_table

    print(markdown_table(run().tables[0]))
