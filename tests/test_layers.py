"""The package's layers, read from its source: no import cycle, and each layer imports only what it may."""

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "project"


def _imports() -> dict[str, set[str]]:
    """Every module of the package and the modules it imports (at any depth: module level or inside functions)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    imports: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                found.update(submodules or [node.module])
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        imports[name] = found
    return imports


def test_no_import_cycle_inside_the_package() -> None:
    imports = _imports()
    graph = {m: {t for t in targets if t in imports and t != m} for m, targets in imports.items()}
    cycles = []

    def visit(start: str, node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt == start:
                cycles.append(path)
            elif nxt not in path and nxt > start:
                visit(start, nxt, [*path, nxt])

    for module in graph:
        visit(module, module, [module])
    assert not cycles, cycles


def _layer(prefix: str) -> dict[str, set[str]]:
    return {m: targets for m, targets in _imports().items() if m == prefix or m.startswith(prefix + ".")}


def test_models_import_only_torch() -> None:
    for module, targets in _layer("project.models").items():
        outside = {t for t in targets if t.startswith(("lightning", "project.")) and not t.startswith("project.models")}
        assert outside <= {"project.errors"}, (module, outside)


def test_compression_knows_nothing_of_lightning_and_data_nothing_of_models() -> None:
    for module, targets in _layer("project.compression").items():
        assert not any(t.startswith(("lightning", "project.callbacks", "project.tasks", "project.cli")) for t in targets), module
    for module, targets in _layer("project.data").items():
        assert not any(t.startswith(("project.models", "project.tasks", "project.callbacks")) for t in targets), module
