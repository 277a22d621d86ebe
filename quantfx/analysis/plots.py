"""The analysis report's files: charts drawn with matplotlib (`pip install quantfx[plot]`)
and a self-contained HTML page (Jinja2, which torch already requires; images embedded). The
numbers never need matplotlib: without it the charts are skipped and the page says so."""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Sequence
from typing import Any

from quantfx.errors import ConfigError
from quantfx.files import staged_files, write_text_files

WORST_HISTOGRAMS = 4
"""How many of the worst tensors get a value histogram in ranges.png."""
WORST_BARS = 20
"""How many of the worst tensors sqnr.png shows."""
TEMPLATE = "report.html.j2"
FILE_SUFFIXES = (".json", ".md", ".html", ".htm", ".png", ".txt", ".csv")
"""A report folder that does not exist yet and ends like this is a file name given by
mistake (it would become a folder called 'report.json')."""


def _figure_class() -> Any:
    """matplotlib's Figure (drawn without pyplot: no global state, no display), or None."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def bar_chart_png(title: str, labels: Sequence[str], values: Sequence[float],
                  unit: str = "") -> bytes | None:
    """A horizontal bar chart, sorted, smallest value on top (negative bars red, infinite ones
    drawn to the largest finite value), with a labelled value axis; PNG bytes, None without
    matplotlib."""
    figure_class = _figure_class()
    if figure_class is None or not labels:
        return None
    rows = sorted(zip(labels, values), key=lambda row: row[1] if row[1] == row[1] else -math.inf)
    finite = [value for _, value in rows if math.isfinite(value)] or [0.0]
    shown = [min(max(value, min(finite)), max(finite)) if value == value else 0.0
             for _, value in rows]
    figure = figure_class(figsize=(8, 1.2 + 0.28 * len(rows)))
    axes = figure.add_subplot()
    positions = list(range(len(rows)))
    axes.barh(positions, shown, color=["#c0503c" if value < 0 else "#466eb4" for value in shown])
    axes.set_yticks(positions, [label if len(label) <= 48 else label[:45] + "..."
                                for label, _ in rows], fontsize=8)
    axes.invert_yaxis()  # the worst first, at the top
    for position, (_, value), length in zip(positions, rows, shown):
        axes.annotate(f"{value:.1f}{unit}", (length, position), xytext=(3, 0),
                      textcoords="offset points", va="center", fontsize=7)
    axes.set_xlabel(unit.strip() or "value")
    axes.set_title(title, fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    return _png(figure)


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float], path: str,
              unit: str = "") -> bool:
    """`bar_chart_png` written atomically to `path`; False (nothing written) without
    matplotlib."""
    data = bar_chart_png(title, labels, values, unit)
    if data is not None:
        _write_bytes(path, data)
    return data is not None


def histograms_png(tensors: Sequence[Any]) -> bytes | None:
    """One panel per tensor: its float values' histogram over [-2 clip, 2 clip] on a log count
    scale (the saturating tails are rare, so invisible on a linear one), the quantizer's range
    marked by dashed lines and the values it clips in red; PNG bytes, None without
    matplotlib."""
    figure_class = _figure_class()
    if figure_class is None or not tensors:
        return None
    figure = figure_class(figsize=(8, 2.4 * len(tensors)))
    for index, tensor in enumerate(tensors):
        axes = figure.add_subplot(len(tensors), 1, index + 1)
        counts = tensor.histogram or [0]
        width = 4.0 * tensor.clip / len(counts)
        lefts = [-2.0 * tensor.clip + bin_index * width for bin_index in range(len(counts))]
        inside = [-tensor.clip - 1e-12 <= left and left + width <= tensor.clip + 1e-12
                  for left in lefts]
        axes.bar(lefts, [max(count, 0) for count in counts], width=width, align="edge",
                 color=["#466eb4" if keep else "#c0503c" for keep in inside])
        if any(counts):
            axes.set_yscale("log")
        for edge in (-tensor.clip, tensor.clip):
            axes.axvline(edge, color="black", linestyle="--", linewidth=1)
        clipped = sum(count for count, keep in zip(counts, inside) if not keep)
        share = clipped / max(sum(counts), 1)
        axes.set_title(f"{tensor.tensor}: range ±{tensor.clip:.4g} at {tensor.bits} bit, "
                       f"{100 * share:.2g} % of values clipped", fontsize=9)
        axes.set_ylabel("count (log)")
    figure.axes[-1].set_xlabel("float value (dashed: the quantizer's range)")
    figure.tight_layout()
    return _png(figure)


def _write_bytes(path: str, data: bytes) -> None:
    with staged_files(path) as (temporary,), open(temporary, "wb") as handle:
        handle.write(data)


def report_html(report: Any, images: dict[str, bytes]) -> str:
    """The report as one self-contained HTML page (its charts embedded as data URIs)."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(os.path.dirname(os.path.abspath(__file__))),
        autoescape=True, keep_trailing_newline=True)
    titles = {"sqnr.png": "SQNR of each tensor's own rounding (worst first)",
              "ranges.png": "Value histograms of the worst tensors"}
    embedded = [{"title": titles.get(name, name), "data": base64.b64encode(data).decode()}
                for name, data in images.items()]
    summary = str(report).split("\nworst tensors", 1)[0].splitlines()
    return environment.get_template(TEMPLATE).render(
        summary=summary, images=embedded, tensors=report.tensors)


def check_report_folder(folder: Any) -> str:
    """`folder` as a path the report can go to (an existing writable folder, or a new one in
    one), else a `ConfigError`: the command line checks it before minutes of work."""
    if not isinstance(folder, (str, os.PathLike)):
        raise ConfigError(f"folder must be a directory path, got {type(folder).__name__}.")
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"{folder!r} is a file; give a folder for the analysis report.")
    if not os.path.exists(folder) and folder.lower().endswith(FILE_SUFFIXES):
        raise ConfigError(f"{folder!r} looks like a file name, but the analysis report is a "
                          "folder of files (report.md, .html, .json, charts): give a folder "
                          "such as 'analysis'.")
    parent = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the analysis report to {folder!r}: {parent!r} is "
                          "missing or not writable. Choose another folder.")
    return folder


def write_report(report: Any, folder: str) -> list[str]:
    """report.md, report.html, report.json and (matplotlib permitting) sqnr.png and ranges.png
    in `folder` (created if missing), each written atomically; returns the paths written."""
    folder = check_report_folder(folder)
    os.makedirs(folder, exist_ok=True)
    worst = report.tensors[:WORST_BARS]
    images = {
        "sqnr.png": bar_chart_png("SQNR of each tensor's own rounding (worst first)",
                                  [item.tensor for item in worst],
                                  [item.alone_db for item in worst], " dB"),
        "ranges.png": histograms_png(report.tensors[:WORST_HISTOGRAMS]),
    }
    images = {name: data for name, data in images.items() if data is not None}
    texts = {os.path.join(folder, "report.md"): report.to_markdown(),
             os.path.join(folder, "report.html"): report_html(report, images),
             os.path.join(folder, "report.json"): report.to_json()}
    write_text_files(texts)
    written = list(texts)
    for name, data in images.items():
        path = os.path.join(folder, name)
        _write_bytes(path, data)
        written.append(path)
    return written
