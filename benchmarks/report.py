"""Tables every part returns, and the generated report: docs/benchmarks.md, .json and PNG plots.

Parts run alone (`python -m benchmarks speed`) replace only their own section: the other parts'
results are read back from docs/benchmarks.json, so the Markdown always shows every part.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantfx.analysis.plots import bar_chart

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = REPO_ROOT / "docs"
JSON_PATH = DOCS_DIR / "benchmarks.json"
MARKDOWN_PATH = DOCS_DIR / "benchmarks.md"


@dataclass
class Table:
    """One result table: a title, column names, rows (dicts keyed by column) and a note."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def add(self, **row: Any) -> None:
        self.rows.append(row)


@dataclass
class Chart:
    """A horizontal bar chart drawn to PNG: one bar per label, optional reference value."""

    title: str
    file_name: str
    labels: list[str]
    values: list[float]
    unit: str = ""


@dataclass
class PartResult:
    """What one benchmark part produced, plus how long it took."""

    name: str
    description: str
    tables: list[Table] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    seconds: float = 0.0
    finished_at: str = ""


def machine_info() -> dict[str, Any]:
    """The hardware and software the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as stream:
            cpu = next(line.split(":", 1)[1].strip() for line in stream if "model name" in line)
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    for module_name in ("torchvision", "onnx", "onnxruntime", "quantfx"):
        with contextlib.suppress(Exception):  # a missing optional package is just not listed
            info[module_name] = __import__(module_name).__version__
    with contextlib.suppress(OSError):
        info["load_average"] = [round(value, 2) for value in os.getloadavg()]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "quantfx"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        info["git_commit"] = commit + (" (quantfx/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def format_cell(value: Any) -> str:
    """A table cell: floats with 2 decimals, None as a dash, pipes escaped."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = [f"### {table.title}", ""]
    if table.note:
        lines += [table.note, ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    for row in table.rows:
        lines.append("| " + " | ".join(format_cell(row.get(column)) for column in table.columns)
                     + " |")
    return "\n".join(lines) + "\n"


def draw_bar_chart(chart: Chart, path: Path) -> None:
    """Write `chart` as a PNG (quantfx's sorted bar chart; matplotlib, the `plot` extra)."""
    bar_chart(chart.title, chart.labels, chart.values, str(path), chart.unit)


def load_results() -> dict[str, Any]:
    """The previous report's JSON (empty if none), so parts run alone keep the others."""
    if JSON_PATH.is_file():
        try:
            return json.loads(JSON_PATH.read_text())
        except json.JSONDecodeError:
            pass
    return {"parts": {}}


def write_report(results: list[PartResult], part_order: list[str], command: str) -> None:
    """Merge `results` into docs/benchmarks.json and regenerate docs/benchmarks.md and plots."""
    DOCS_DIR.mkdir(exist_ok=True)
    document = load_results()
    document.setdefault("parts", {})
    for result in results:
        document["parts"][result.name] = asdict(result)
        for chart in result.charts:
            draw_bar_chart(chart, DOCS_DIR / chart.file_name)
    document["machine"] = machine_info()
    document["command"] = command
    document["generated_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    JSON_PATH.write_text(json.dumps(document, indent=1, default=str) + "\n")
    MARKDOWN_PATH.write_text(render_markdown(document, part_order))
    update_readme_summary(document)


README_PATH = REPO_ROOT / "README.md"
SUMMARY_START = "<!-- benchmarks-summary:start -->"
SUMMARY_END = "<!-- benchmarks-summary:end -->"
SUMMARY_METHODS = {
    "float": "float",
    "quantfx PTC default (histogram+MSE)": "quantfx PTC",
    "quantfx PTC 16-bit": "quantfx 16-bit",
    "quantfx QAT (from PTC default)": "quantfx QAT",
    "ORT on quantfx export (default)": "ORT on quantfx file",
    "torch.ao FX PTQ (x86)": "torch.ao FX PTQ",
    "ORT quantize_static MinMax": "ORT quantize_static",
}


HARD_CASE_METHODS = {
    "quantfx default": "quantfx default",
    "quantfx + equalization + learned rounding": "+ equalization + learned rounding",
    "quantfx per-channel weights (every conv)": "per-channel weights",
    "torch.ao FX PTQ (x86)": "torch.ao FX PTQ",
    "ORT quantize_static MinMax": "ORT quantize_static (per-channel)",
}


def _table(document: dict[str, Any], part: str, title: str) -> dict[str, Any] | None:
    tables = document.get("parts", {}).get(part, {}).get("tables", [])
    return next((table for table in tables if table["title"] == title), None)


def render_summary(document: dict[str, Any]) -> str:
    """The README's results section: accuracy per method, coverage, calibration overhead."""
    lines = [f"From `docs/benchmarks.md` (generated {document.get('generated_at', '')} by "
             "`python3 -m nox -s bench`; do not edit here).", ""]
    accuracy = _table(document, "accuracy", "Fashion-MNIST accuracy (top-1 %, 10k test images)")
    if accuracy:
        models = list(dict.fromkeys(row["model"] for row in accuracy["rows"]))
        methods = [m for m in SUMMARY_METHODS if any(r["method"] == m for r in accuracy["rows"])]
        pivot = Table("Fashion-MNIST top-1 % (int8 unless noted)",
                      ["model", *[SUMMARY_METHODS[m] for m in methods]])
        for model in models:
            cells = {row["method"]: row["accuracy %"] for row in accuracy["rows"]
                     if row["model"] == model}
            pivot.add(model=model, **{SUMMARY_METHODS[m]: cells.get(m, "") for m in methods})
        lines.append(markdown_table(pivot))
    hard = _table(document, "hard_cases", "Hard cases for post-training quantization")
    if hard:
        cases = list(dict.fromkeys(row["case"] for row in hard["rows"]))
        pivot = Table("Hard cases: output SQNR against float, dB (higher is better)",
                      ["case", *HARD_CASE_METHODS.values()])
        for case in cases:
            cells = {row["method"]: row.get("output SQNR dB") for row in hard["rows"]
                     if row["case"] == case}
            pivot.add(case=case, **{label: cells.get(method, "")
                                    for method, label in HARD_CASE_METHODS.items()})
        lines.append(markdown_table(pivot))
    for part, title in (("coverage", "Coverage summary"),
                        ("detector", "YOLOX-style detector on Fashion-MNIST canvases: mAP@0.5 (%)"),
                        ("speed", "Calibration forward / float forward")):
        table = _table(document, part, title)
        if table:
            lines.append(markdown_table(Table(**table)))
    return "\n".join(lines).rstrip() + "\n"


def update_readme_summary(document: dict[str, Any]) -> None:
    """Replace the README's section between the summary markers with the report's summary."""
    if not README_PATH.is_file():
        return
    text = README_PATH.read_text()
    if SUMMARY_START not in text or SUMMARY_END not in text:
        return
    head, rest = text.split(SUMMARY_START, 1)
    _, tail = rest.split(SUMMARY_END, 1)
    summary = render_summary(document)
    README_PATH.write_text(f"{head}{SUMMARY_START}\n{summary}{SUMMARY_END}{tail}")


def render_markdown(document: dict[str, Any], part_order: list[str]) -> str:
    """The whole Markdown report from the JSON document."""
    machine = document.get("machine", {})
    lines = [
        "# quantfx benchmarks",
        "",
        "Generated by `python -m benchmarks` (or `nox -s bench`); do not edit by hand. "
        "Regenerate everything with:",
        "",
        "```bash",
        "python -m benchmarks            # all parts; or name parts: accuracy speed coverage",
        "```",
        "",
        f"Last run: `{document.get('command', '')}` at {document.get('generated_at', '')}.",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    lines.append("")
    parts = document.get("parts", {})
    for name in [*part_order, *sorted(set(parts) - set(part_order))]:
        if name not in parts:
            continue
        part = parts[name]
        lines += [f"## {name}", "", part.get("description", ""), "",
                  f"_Part ran in {part.get('seconds', 0):.0f} s, finished "
                  f"{part.get('finished_at', '')}._", ""]
        for table in part.get("tables", []):
            lines.append(markdown_table(Table(**table)))
        for chart in part.get("charts", []):
            lines += [f"![{chart['title']}]({chart['file_name']})", ""]
    return "\n".join(lines).rstrip() + "\n"


def command_line() -> str:
    """How this process was started, for the report."""
    return "python -m benchmarks " + " ".join(sys.argv[1:])
