"""The house rules, checked on the code itself: imports point one way (no cycle, function-level
imports included), no module imports another module's private name, no file much over 400
lines, no function over 60, and every op the placement tables call shape-only has an ONNX
emitter."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest
import torch.fx as fx

from quantfx import ops
from quantfx.export import registry

PACKAGE = Path(__file__).resolve().parent.parent / "quantfx"
MAX_LINES = 400
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> list[tuple[str, list[str]]]:
    """(imported quantfx module, imported names) for every import in `path`, at any depth."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{item}" for item in names if f"{base}.{item}" in modules]
            found += [(sub, []) for sub in submodules]
            found.append((base, [item for item in names if f"{base}.{item}" not in modules]))
    return [(target, names) for target, names in found if target in modules]


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, list[str]]]]]:
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(paths)
    edges: dict[str, set[str]] = {}
    imports = {}
    for name, path in paths.items():
        imports[name] = _imports(path, modules)
        edges[name] = {target for target, _ in imports[name] if target != name
                       and not (path.name == "__init__.py" and target.startswith(name + "."))}
    return edges, imports


def test_no_import_cycles():
    edges, _ = _graph()
    visiting, done, cycles = set(), set(), []

    def visit(module: str, trail: list[str]) -> None:
        if module in done:
            return
        if module in visiting:
            cycles.append(trail[trail.index(module):] + [module])
            return
        visiting.add(module)
        for target in sorted(edges[module]):
            visit(target, trail + [module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(edges):
        visit(module, [])
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles[:5])


FLOORS = (
    ("ground", ("errors", "checks", "version", "qmath", "modules", "ops", "tidl.profiles",
                "config", "arguments")),
    ("records", ("observers", "layers", "state", "inputs", "trace", "files", "sources",
                 "settings", "ranks")),
    ("quantizers", ("quantizers", "quantizers.*")),
    ("passes", ("passes", "passes.*")),
    ("op writers", ("export.builder", "export.emitters", "export.emitters.*",
                    "export.registry")),
    ("front end", ("frontend",)),
    ("parts", ("partial",)),
    ("ranks", ("distributed",)),
    ("QAT", ("qat", "qat.*")),
    ("convert", ("convert",)),
    ("PTC", ("ptc", "ptc.*")),
    ("distillation", ("distillation", "distillation_*")),
    ("TIDL checker", ("tidl", "tidl.*")),
    ("export", ("export", "export.*")),
    ("questions", ("analysis", "analysis.*")),
    ("application", ("demo", "demo.*", "app", "app.*", "__main__", "")),
)
"""The floors of docs/design.md's code map, bottom to top (module names below `quantfx.`, the
first matching floor wins): a module imports only from its own floor or those below it."""


def _floor(module: str) -> int:
    name = module.removeprefix("quantfx").removeprefix(".")
    for index, (_, patterns) in enumerate(FLOORS):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            return index
    raise AssertionError(f"{module} is on no floor of FLOORS: place it there and in the code map")


def test_imports_point_down_the_floors():
    edges, imports = _graph()
    named = {(module, target) for module, found in imports.items() for target, names in found
             if names or target != "quantfx"}  # `from quantfx import ops` imports only ops
    upward = sorted(f"{module} ({FLOORS[_floor(module)][0]}) imports {target} "
                    f"({FLOORS[_floor(target)][0]})"
                    for module, targets in edges.items() for target in targets
                    if (module, target) in named and _floor(target) > _floor(module))
    assert not upward


def test_no_private_names_imported_across_modules():
    _, imports = _graph()
    private = [f"{module} imports {target}.{name}" for module, found in imports.items()
               for target, names in found for name in names
               if name.startswith("_") and not name.endswith("__") and target != module]
    assert not private


def test_no_file_much_over_the_limit():
    long_files = {str(path.relative_to(PACKAGE)): count for path in PACKAGE.rglob("*.py")
                  if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long_files


def test_no_function_over_the_limit():
    long_functions = {
        f"{path.relative_to(PACKAGE)}:{node.name}": node.end_lineno - node.lineno + 1
        for path in PACKAGE.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES}
    assert not long_functions


def _has_emitter(target) -> bool:
    if isinstance(target, type):
        return any(issubclass(target, kind if isinstance(kind, tuple) else (kind,))
                   for kind, _ in registry.MODULE_EMITTERS)
    return target in registry.CALL_EMITTERS


@pytest.mark.parametrize("target", sorted(
    list(ops.SHAPE_ONLY_MODULES) + list(ops.SHAPE_ONLY_FUNCTIONS) + list(ops.SHAPE_ONLY_METHODS)
    + list(ops.IDENTITY_CALLS) + list(ops.RESHAPE_CALLS) + list(ops.DROPOUT_FUNCTIONS),
    key=repr), ids=repr)
def test_every_shape_only_op_has_an_emitter(target):
    assert _has_emitter(target)


def test_a_graph_walk_finds_the_emitter_of_each_table_row():
    """The registry answers for a real node the way its tables say (a method and a module)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_method("narrow", (x, 1, 0, 2))
    emitter, module = registry.emitter_for(None, node)
    assert emitter is registry.CALL_EMITTERS["narrow"] and module is None


def test_only_partial_reads_which_parts_a_model_has():
    """Partial quantization is one room: every stage asks `partial.quantized_parts(state)`
    instead of branching on the state's parts itself (the state only stores them)."""
    readers = sorted(
        f"{path.relative_to(PACKAGE)}:{node.lineno}" for path in PACKAGE.rglob("*.py")
        if path.name not in ("partial.py", "state.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "parts")
    assert not readers
