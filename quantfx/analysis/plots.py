"""Small PNG charts (with Pillow, which torchvision installs) and the analysis report files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from quantfx.errors import ConfigError


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float], path: str,
              unit: str = "") -> None:
    """A horizontal bar chart, one bar per label (negative values in red), written as PNG."""
    from PIL import Image, ImageDraw

    row_height, label_width, bar_width, margin = 18, 260, 420, 10
    height = 2 * margin + 24 + row_height * len(labels)
    image = Image.new("RGB", (label_width + bar_width + 90, height), "white")
    draw = ImageDraw.Draw(image)
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
    image.save(path)


def write_report(report: Any, folder: str) -> list[str]:
    """report.md, report.json and (Pillow permitting) sqnr.png in `folder`; the paths."""
    if not isinstance(folder, (str, os.PathLike)) or os.path.isfile(folder):
        raise ConfigError(f"folder must be a directory path, got {folder!r}.")
    os.makedirs(folder, exist_ok=True)
    written = []
    for name, text in (("report.md", report.to_markdown()), ("report.json", report.to_json())):
        path = os.path.join(folder, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        written.append(path)
    worst = report.tensors[:20]
    try:
        path = os.path.join(folder, "sqnr.png")
        bar_chart("SQNR of each tensor's own rounding (worst first)",
                  [item.tensor for item in worst], [item.alone_db for item in worst], path,
                  " dB")
        written.append(path)
    except ImportError:  # pragma: no cover - Pillow comes with torchvision
        pass
    return written
