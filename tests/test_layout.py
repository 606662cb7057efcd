"""The layout's promises: no import circle among the project's modules, a device-side import that never
loads torch, and old module paths that still import (with a DeprecationWarning) after a move."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def project_modules() -> dict[str, Path]:
    """Every module of the installed packages, by its dotted name, from pyproject's package folders."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = setuptools["package-dir"]
    modules = {}
    for package in setuptools["packages"]:
        top = next(p for p in sorted(folders, key=len, reverse=True) if package == p or package.startswith(p + "."))
        folder = ROOT / folders[top] / Path(*package[len(top):].split(".")[1:])
        for file in folder.glob("*.py"):
            modules[package if file.stem == "__init__" else f"{package}.{file.stem}"] = file
    return modules


def imports_of(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its source: at the top, inside functions (an import
    deferred to call time still needs the other module to be importable first) and under TYPE_CHECKING."""
    package = name if file.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each group of modules that import one another in a circle (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def describe(circle: list[str], graph: dict[str, set[str]]) -> str:
    """One path around the circle, e.g. ``a -> b -> a``, so the message says which imports to cut."""
    path = [circle[0]]
    while True:
        step = next(m for m in sorted(graph[path[-1]]) if m in circle and (m == circle[0] or m not in path))
        path.append(step)
        if step == circle[0]:
            return " -> ".join(path)


def test_the_walker_finds_every_module_and_a_circle_when_there_is_one():
    modules = project_modules()
    assert {"edgelora.cli", "edgelora.format.manifest", "edgelora.runtime.model", "edgelora.exporters.export",
            "edgelora.training.trainer", "edgelora.demo.run", "edgelora.checks.run"} <= set(modules)
    assert "edgelora.format.manifest" in imports_of("edgelora.runtime.model", modules["edgelora.runtime.model"],
                                                    modules)
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_circles(graph) == [["a", "b", "c"]] and describe(["a", "b", "c"], graph) == "a -> b -> c -> a"


def test_no_import_circles():
    modules = project_modules()
    graph = {name: imports_of(name, file, modules) for name, file in modules.items()}
    circles = [describe(circle, graph) for circle in import_circles(graph)]
    assert not circles, "import circles: " + "; ".join(circles)


@pytest.mark.parametrize("module", ["edgelora.runtime", "edgelora.cli", "edgelora.format.adapter_file"])
def test_device_side_imports_never_load_torch(module):
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, f"importing {module} loaded torch"


@pytest.mark.parametrize("old, new", [("edgelora.manifest", "edgelora.format.manifest"),
                                      ("edgelora.adapter_file", "edgelora.format.adapter_file"),
                                      ("edgelora.check", "edgelora.checks.run"),
                                      ("edgelora.exporters.demo_tasks", "edgelora.demo.tasks")])
def test_old_module_paths_still_import_with_a_warning(old, new):
    import importlib

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_the_old_package_writer_still_takes_keyword_options(tmp_path):
    import importlib

    from edgelora.errors import EdgeLoraError

    sys.modules.pop("edgelora.exporters.package_writer", None)
    with pytest.warns(DeprecationWarning, match="edgelora.exporters.export"):
        old = importlib.import_module("edgelora.exporters.package_writer")
    with pytest.raises(EdgeLoraError, match="--block-size 7"):  # refused by ExportOptions, before any work
        old.export_package(tmp_path / "base", {}, tmp_path / "pkg", block_size=7, progress=False)
