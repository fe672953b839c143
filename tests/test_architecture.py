"""The module map of docs/architecture.md holds: every ``service`` module is in one layer of its table, and
imports only modules of its own layer or a lower one (a call never goes back up a layer)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (\d) [a-z ]+ \| (.+?) \| .+ \|$")


def layers() -> dict[str, int]:
    """``service`` module (dotted, without the package) → its layer number, from the doc's table."""
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    found: dict[str, int] = {}
    for line in doc.splitlines():
        match = ROW.match(line)
        if match:
            for name in re.findall(r"`([a-z_.]+)`", match.group(2)):
                found[name] = int(match.group(1))
    return found


def service_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((REPO / "service").rglob("*.py")):
        parts = path.relative_to(REPO / "service").with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name:
            modules[name] = path
    return modules


def imported(path: Path) -> set[str]:
    """The ``service`` modules a file imports (``from service.x import y`` → ``x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service."):
            names.add(node.module.removeprefix("service."))
        elif isinstance(node, ast.ImportFrom) and node.module == "service":
            names.update(alias.name for alias in node.names)
    return names


def test_every_service_module_is_in_the_documented_map() -> None:
    assert sorted(service_modules()) == sorted(layers())


def test_no_module_imports_from_a_higher_layer() -> None:
    layer = layers()
    upward = [
        f"{name} (layer {layer[name]}) imports {target} (layer {layer[target]})"
        for name, path in service_modules().items()
        for target in imported(path)
        if layer[target] < layer[name]
    ]
    assert not upward, upward
