"""PNG charts (with Pillow: `pip install quantfx[plot]`, which torchvision already brings) and
the analysis report files. The numbers never need Pillow: without it the charts are skipped."""

from __future__ import annotations

import html
import io
import os
from collections.abc import Sequence
from typing import Any

from quantfx.errors import ConfigError
from quantfx.files import staged_files, write_text_files

WORST_HISTOGRAMS = 4
"""How many of the worst tensors get a value histogram in ranges.png."""


def _pillow() -> Any:
    """PIL's Image and ImageDraw, or None when Pillow is not installed."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    return Image, ImageDraw


def bar_chart_png(title: str, labels: Sequence[str], values: Sequence[float],
                  unit: str = "") -> bytes | None:
    """A horizontal bar chart, one bar per label (negative values in red), as PNG bytes; None
    without Pillow."""
    pillow = _pillow()
    if pillow is None:
        return None
    image_class, draw_class = pillow
    row_height, label_width, bar_width, margin = 18, 260, 420, 10
    height = 2 * margin + 24 + row_height * len(labels)
    image = image_class.new("RGB", (label_width + bar_width + 90, height), "white")
    draw = draw_class.Draw(image)
    draw.text((margin, margin), title, fill="black")
    finite = [abs(value) for value in values if value == value and abs(value) != float("inf")]
    top = max(finite + [1e-12])
    for index, (label, value) in enumerate(zip(labels, values)):
        y = margin + 24 + index * row_height
        draw.text((margin, y + 2), label[:42], fill="black")
        shown = min(abs(value), top) if value == value else 0.0
        length = int(bar_width * shown / top)
        draw.rectangle([label_width, y + 2, label_width + max(length, 1), y + row_height - 3],
                       fill=(70, 110, 180) if value >= 0 else (200, 80, 60))
        draw.text((label_width + length + 4, y + 2), f"{value:.2f}{unit}", fill="black")
    return _png(image)


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float], path: str,
              unit: str = "") -> bool:
    """`bar_chart_png` written atomically to `path`; False (nothing written) without Pillow."""
    data = bar_chart_png(title, labels, values, unit)
    if data is not None:
        _write_bytes(path, data)
    return data is not None


def histograms_png(tensors: Sequence[Any]) -> bytes | None:
    """One panel per tensor: its float value histogram over [-2 clip, 2 clip] with the
    quantizer's range marked (red bars fall outside it and saturate); None without Pillow."""
    pillow = _pillow()
    if pillow is None or not tensors:
        return None
    image_class, draw_class = pillow
    panel_width, panel_height, margin = 360, 150, 10
    image = image_class.new("RGB", (panel_width + 2 * margin,
                                    len(tensors) * (panel_height + margin) + margin), "white")
    draw = draw_class.Draw(image)
    for index, tensor in enumerate(tensors):
        top = margin + index * (panel_height + margin)
        draw.text((margin, top), f"{tensor.tensor}  (range +-{tensor.clip:.4g}, "
                                 f"{tensor.bits} bit)", fill="black")
        counts = tensor.histogram or [0]
        tallest = max(max(counts), 1)
        bin_width = panel_width / len(counts)
        base = top + panel_height - 4
        for bin_index, count in enumerate(counts):
            # bins cover [-2 clip, 2 clip]: the middle half is inside the quantizer's range
            inside = len(counts) / 4 <= bin_index < 3 * len(counts) / 4
            left = margin + bin_index * bin_width
            height = int((panel_height - 24) * count / tallest)
            draw.rectangle([left, base - height, left + bin_width - 1, base],
                           fill=(70, 110, 180) if inside else (200, 80, 60))
        for quarter in (1, 3):
            x = margin + quarter * panel_width / 4
            draw.line([x, top + 16, x, base], fill="black")
    return _png(image)


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_bytes(path: str, data: bytes) -> None:
    with staged_files(path) as (temporary,), open(temporary, "wb") as handle:
        handle.write(data)


def _html(report: Any, images: list[str]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(t.tensor)}</td><td>{html.escape(t.layer or '')}</td>"
        f"<td>{t.bits}</td><td>{t.activation_alone_db:.1f}</td>"
        f"<td>{'' if t.weight_alone_db is None else f'{t.weight_alone_db:.1f}'}</td>"
        f"<td>{t.sqnr_in_model_db:.1f}</td></tr>" for t in report.tensors)
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in str(report).splitlines()[:3])
    pictures = "".join(f'<p><img src="{name}" alt="{name}"></p>' for name in images)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>quantfx analyze</title>"
            "</head><body><h1>quantfx analyze</h1>"
            f"<ul>{summary}</ul>{pictures}<table border='1'><tr><th>tensor</th><th>layer</th>"
            "<th>bits</th><th>own rounding dB</th><th>weights alone dB</th><th>in model dB</th>"
            f"</tr>{rows}</table></body></html>\n")


def check_report_folder(folder: Any) -> str:
    """`folder` as a path the report can go to (an existing writable folder, or a new one in
    one), else a `ConfigError`: the command line checks it before minutes of work."""
    if not isinstance(folder, (str, os.PathLike)):
        raise ConfigError(f"folder must be a directory path, got {type(folder).__name__}.")
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"{folder!r} is a file; give a folder for the analysis report.")
    parent = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the analysis report to {folder!r}: {parent!r} is "
                          "missing or not writable. Choose another folder.")
    return folder


def write_report(report: Any, folder: str) -> list[str]:
    """report.md, report.html, report.json and (Pillow permitting) sqnr.png and ranges.png in
    `folder` (created if missing), each written atomically; returns the paths written."""
    folder = check_report_folder(folder)
    os.makedirs(folder, exist_ok=True)
    worst = report.tensors[:20]
    images = {
        "sqnr.png": bar_chart_png("SQNR of each tensor's own rounding (worst first)",
                                  [item.tensor for item in worst],
                                  [item.alone_db for item in worst], " dB"),
        "ranges.png": histograms_png(report.tensors[:WORST_HISTOGRAMS]),
    }
    images = {name: data for name, data in images.items() if data is not None}
    texts = {os.path.join(folder, "report.md"): report.to_markdown(),
             os.path.join(folder, "report.html"): _html(report, list(images)),
             os.path.join(folder, "report.json"): report.to_json()}
    write_text_files(texts)
    written = list(texts)
    for name, data in images.items():
        path = os.path.join(folder, name)
        _write_bytes(path, data)
        written.append(path)
    return written
