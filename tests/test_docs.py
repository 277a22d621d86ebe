"""The documentation is code: every Python block in README.md and docs/ runs, every shell line
names a real command and options, every JSON block parses, and the API and CLI references
name every public name, signature, field, subcommand and option."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import quantfx as qf
from benchmarks.__main__ import PARTS
from quantfx.app import cli

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\s*$")
RUN_LANGUAGES = ("python", "bash", "json", "text")
NOX_SESSIONS = set(re.findall(r"@nox\.session\([^)]*\)\s*def (\w+)",
                              (REPO / "noxfile.py").read_text()))


def code_blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, code, first line number) of every fenced block in `path`."""
    blocks, language, lines, start = [], None, [], 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if match and language is None:
            language, lines, start = match.group(1), [], number + 1
        elif line.startswith("```") and language is not None:
            blocks.append((language, "\n".join(lines), start))
            language = None
        elif language is not None:
            lines.append(line)
    assert language is None, f"{path.name}: a code block opened at line {start} never closes"
    return blocks


class SmallNet(nn.Module):
    """What `model` is in the documentation: a conv-BN-ReLU CNN on 3-channel images."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def namespace() -> dict:
    """The names the documentation's examples assume: a model, data, a loss and an optimizer."""
    torch.manual_seed(0)
    model = SmallNet().eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 224, 224, generator=generator)
    labels = torch.randint(0, 10, (8,), generator=generator)
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    example_inputs = (images[:1],)
    config = qf.QuantConfig(progress=False)
    prepared = qf.prepare(model, example_inputs, config)
    qf.calibrate(prepared, loader)
    return {
        "torch": torch, "nn": nn, "qf": qf, "model": model, "float_model": model,
        "example_inputs": example_inputs, "images": images[:4], "calibration_loader": loader,
        "loader": loader, "calibration_data": [images[:4], images[4:]], "epochs": 1,
        "criterion": nn.CrossEntropyLoss(), "config": config, "prepared": prepared,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=1e-4),
    }


def check_shell_line(line: str) -> None:
    """A documented command must exist and its options must parse."""
    words = shlex.split(line, comments=True)
    if not words:
        return
    if words[:3] in (["python3", "-m", "nox"], ["python", "-m", "nox"]):
        sessions = words[words.index("-s") + 1:] if "-s" in words else []
        sessions = sessions[:sessions.index("--")] if "--" in sessions else sessions
        assert sessions and set(sessions) <= NOX_SESSIONS, f"unknown nox session in {line!r}"
    elif words[0] == "quantfx" or words[:3] in (["python", "-m", "quantfx"],
                                                 ["python3", "-m", "quantfx"]):
        arguments = words[1:] if words[0] == "quantfx" else words[3:]
        cli.build_parser().parse_args(arguments)  # SystemExit on an unknown option
    elif words[:3] in (["python", "-m", "benchmarks"], ["python3", "-m", "benchmarks"]):
        parts = [word for word in words[3:] if not word.startswith("-")]
        assert set(parts) <= set(PARTS), f"unknown benchmark part in {line!r}"
    elif words[0] in ("python", "python3") and words[1].endswith(".py"):
        assert (REPO / words[1]).is_file(), f"{words[1]} does not exist"
    elif not (words[:4] == ["python3", "-m", "pip", "install"]
              or words[0] in ("pip", "apt-get", "git", "cd", "bash")):
        raise AssertionError(f"the documentation runs a command this test does not know: "
                             f"{line!r}; teach check_shell_line what it is")


# A chained README line ("pip install nox && python3 -m nox ...") is checked part by part.
def check_shell(code: str) -> None:
    for line in code.splitlines():
        for part in line.split("&&"):
            check_shell_line(part.strip())


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.name)
def test_every_code_block_runs(path, tmp_path, monkeypatch):
    blocks = code_blocks(path)
    for language, _, start in blocks:
        assert language in RUN_LANGUAGES, (
            f"{path.name}:{start}: tag the block as one of {RUN_LANGUAGES} (got {language!r})")
    python = [(code, start) for language, code, start in blocks if language == "python"]
    names = namespace() if python else {}
    monkeypatch.chdir(tmp_path)
    for language, code, start in blocks:
        if language == "python":
            exec(compile(code, f"{path.name}:{start}", "exec"), names)  # noqa: S102
        elif language == "bash":
            check_shell(code)
        elif language == "json":
            json.loads(code)


def signature_line(name: str, function: object) -> str:
    """`qf.name(a, b=1, *, c=None)`: the form the API reference writes signatures in."""
    parts, keyword_only = [], False
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
            keyword_only = True
        default = "" if parameter.default is parameter.empty else f"={parameter.default!r}"
        parts.append(parameter.name + default)
    return f"qf.{name}({', '.join(parts)})"


API = (REPO / "docs" / "api.md").read_text()


def test_every_name_the_api_reference_documents_is_exported():
    """`from quantfx import *` gives what docs/api.md documents (distill was documented and
    reachable as qf.distill, but not in `__all__`)."""
    documented = re.findall(r"^### `(\w+)`", API, flags=re.MULTILINE)
    assert documented
    assert sorted(set(documented) - set(qf.__all__)) == []


@pytest.mark.parametrize("name", qf.__all__)
def test_every_public_name_is_in_the_api_reference(name):
    assert f"### `{name}`" in API, f"docs/api.md has no section for qf.{name}"
    value = getattr(qf, name)
    if inspect.isfunction(value):
        expected = signature_line(name, value)
        assert f"`{expected}`" in API, f"docs/api.md: write the signature as `{expected}`"
        assert inspect.getdoc(value), f"qf.{name} has no docstring"
    if dataclasses.is_dataclass(value):
        section = API.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        missing = [f.name for f in dataclasses.fields(value) if f"`{f.name}`" not in section]
        assert not missing, f"docs/api.md: {name}'s section does not name {missing}"


CLI_DOC = (REPO / "docs" / "cli.md").read_text()


def test_every_subcommand_and_option_is_in_the_cli_reference():
    parser = cli.build_parser()
    (subparsers,) = [action for action in parser._actions  # argparse keeps them here
                     if isinstance(action, type(parser._subparsers._group_actions[0]))]
    for command, subparser in subparsers.choices.items():
        assert f"quantfx {command}" in CLI_DOC, f"docs/cli.md: no section for {command}"
        options = [option for action in subparser._actions for option in action.option_strings
                   if option.startswith("--") and option != "--help"]
        missing = [option for option in options if f"`{option}" not in CLI_DOC]
        assert not missing, f"docs/cli.md does not document {command} {missing}"


def test_the_code_map_names_every_module():
    """docs/design.md's code map names each module of the package (the emitters as a family:
    `emitters/`, one module per op family), so a newcomer finds every room in it."""
    design = (REPO / "docs" / "design.md").read_text()
    code_map = design.split("## Code map", 1)[1].split("\n## ", 1)[0]
    package = REPO / "quantfx"
    missing = [str(path.relative_to(package)) for path in sorted(package.rglob("*.py"))
               if path.stem != "__init__" and path.parent.name != "emitters"
               and not re.search(rf"`([\w/]+/)?{path.stem}(\.py)?`", code_map)]
    assert not missing, f"docs/design.md's code map does not name {missing}"
