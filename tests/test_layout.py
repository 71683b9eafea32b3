"""The package's layout: imports flow one way through the layers, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "susc_callback"
LAYERS = [
    {"config", "store.files"},
    {"components"},
    {"data"},
    {"sampler"},
    {"estimator"},
    {"store.run", "store"},
    {"analysis"},
    {"influence", "clusters", "calibration", "sharding"},
    {"logging"},
    {"callback"},
    {"patterning"},
    {"cli"},
    {"__init__", "__main__"},
]
"""Lowest first: a module may import from its own layer and the layers below it."""


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _layer(module: str) -> int:
    for depth in (2, 1):
        prefix = ".".join(module.split(".")[:depth])
        for index, names in enumerate(LAYERS):
            if prefix in names:
                return index
    raise AssertionError(f"susc_callback.{module} belongs to no layer; add it to LAYERS")


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("susc_callback."):
                found.add(name.removeprefix("susc_callback."))
            elif isinstance(node, ast.ImportFrom) and name == "susc_callback":
                found.update(alias.name for alias in node.names)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=_module_name)
def test_imports_flow_from_lower_layers_only(path):
    module = _module_name(path)
    for imported in _imports(path):
        assert _layer(imported) <= _layer(module), \
            f"susc_callback.{module} (layer {_layer(module)}) imports susc_callback." \
            f"{imported} (layer {_layer(imported)})"


def test_no_import_cycle():
    graph = {_module_name(p).removesuffix(".__init__"): _imports(p) for p in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done" or module not in graph:
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(trail + [module])
        state[module] = "open"
        for imported in graph[module]:
            visit(imported, trail + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


@pytest.mark.parametrize("path", MODULES, ids=_module_name)
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= 400
