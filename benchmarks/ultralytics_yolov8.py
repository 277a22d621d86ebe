"""Check `qf.UltralyticsYolov8Network` and `qf.Yolov8MetaArch.from_ultralytics` on the real
ultralytics YOLOv8n (built from its yaml, random weights: nothing downloads), not a benchmark
part (ultralytics is AGPL and heavy; it is never a quantfx dependency):

    pip install ultralytics && python -m benchmarks.ultralytics_yolov8

Prints how far the decode quantfx writes into the file (DFL expectation, anchors at cell
centres, distances times the stride) is from ultralytics' own decode of the same float heads,
then quantizes, exports (meta-architecture 8) and prints the export summary and TIDL's
warnings.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch

import quantfx as qf


def _decode(heads: tuple[torch.Tensor, ...], arch: qf.Yolov8MetaArch
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes [K, 4] x1y1x2y2, scores [K, C]) as the exported file decodes them."""
    boxes, scores = [], []
    for level, stride in enumerate(arch.strides):
        classes, distribution = heads[2 * level], heads[2 * level + 1]
        height, width = classes.shape[2:]
        sides = distribution.reshape(4, arch.reg_max, -1).softmax(1)
        sides = (sides * torch.arange(arch.reg_max)[None, :, None]).sum(1).T * stride
        rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        center = (torch.stack([columns.flatten(), rows.flatten()], 1) + 0.5) * stride
        boxes.append(torch.cat([center - sides[:, :2], center + sides[:, 2:]], 1))
        scores.append(classes.reshape(classes.shape[1], -1).T.sigmoid())
    return torch.cat(boxes), torch.cat(scores)


def main(size: int = 320) -> int:
    try:
        from ultralytics.nn.tasks import DetectionModel
    except ImportError:
        print("ultralytics is not installed: pip install ultralytics", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=80, verbose=False).eval()
    network = qf.UltralyticsYolov8Network(model).eval()
    arch = qf.Yolov8MetaArch.from_ultralytics(model, confidence_threshold=0.25)
    image = torch.rand(1, 3, size, size)
    with torch.no_grad():
        theirs = model(image)[0][0]  # [4 + classes, anchors]: centre x, y, width, height
        boxes, scores = _decode(network(image), arch)
    corners = torch.cat([theirs[:2] - theirs[2:4] / 2, theirs[:2] + theirs[2:4] / 2]).T
    print(f"{arch}\ndecode vs ultralytics: boxes {float((boxes - corners).abs().max()):.2e} px, "
          f"scores {float((scores - theirs[4:].T).abs().max()):.2e}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = qf.prepare(network, (image,), qf.QuantConfig(progress=False))
    qf.calibrate(prepared, [torch.rand(2, 3, size, size) for _ in range(2)])
    with tempfile.TemporaryDirectory() as folder:
        report = qf.export_onnx(qf.convert(prepared), image, Path(folder) / "yolov8n.onnx",
                                detection=arch)
    print(report.summary())
    for finding in report.tidl.warnings():
        print(finding)
    return 0


if __name__ == "__main__":
    sys.exit(main())
