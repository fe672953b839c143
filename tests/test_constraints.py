"""constraints.txt (scripts/lock.sh) in step with pyproject.toml and with what the tests run on: every
dependency the project reaches is pinned, each pin satisfies pyproject's range, the packages installed
here are the pinned ones (the test command installs with the file), and every install of the project in
the scripts and the Dockerfile goes through it."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = ("cpu", "train", "dev")
"""What the test command installs (``gpu`` swaps onnxruntime for onnxruntime-gpu, the Dockerfile's pin)."""
LEFT_OUT = {"clickrank", "torch", "onnxruntime-gpu"}
"""Not pinned there: the project, torch (pyproject pins it; its local tag varies), onnxruntime-gpu."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, Version]:
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            found[canonical(name)] = Version(version)
    return found


def declared() -> list[Requirement]:
    optional = PYPROJECT["project"]["optional-dependencies"]
    return [Requirement(r) for r in PYPROJECT["project"]["dependencies"]] + [
        Requirement(r) for extra in optional.values() for r in extra
    ]


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pinned = pins()
    for requirement in declared():
        name = canonical(requirement.name)
        if name in LEFT_OUT:
            continue
        assert name in pinned, f"{name} is in pyproject.toml but not in constraints.txt: run scripts/lock.sh"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject's {requirement.specifier}"
        )


def test_what_is_installed_is_what_is_pinned() -> None:
    """The closure of ``clickrank[cpu,train,dev]`` as installed here: every package pinned, at its pin."""
    pinned = pins()
    seen: set[str] = set()
    queue: list[tuple[str, frozenset[str]]] = [("clickrank", frozenset(EXTRAS))]
    while queue:
        name, extras = queue.pop()
        dist = distribution(name)
        for text in dist.requires or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker and not any(marker.evaluate({"extra": e}) for e in extras or {""}):
                continue
            child = canonical(requirement.name)
            if child in seen:
                continue
            seen.add(child)
            try:
                version = Version(distribution(child).version)
            except PackageNotFoundError as exc:
                raise AssertionError(f"{child}, required by {name}, is not installed") from exc
            if child not in LEFT_OUT:
                assert child in pinned, f"{child} (required by {name}) is not in constraints.txt"
                assert version == pinned[child], f"{child} {version} installed, {pinned[child]} pinned"
            queue.append((child, frozenset(requirement.extras)))
    assert len(seen) > 40, sorted(seen)  # the walk reached the transitive closure, not just the top level


def test_every_install_of_the_project_goes_through_the_constraints() -> None:
    installs = {
        path.name: re.findall(r"pip\"? install[^\n]*?(?:-e )?\"\.\[[a-z,]+\]\"", path.read_text())
        for path in (REPO / "scripts").glob("*.sh")
        if path.name != "lock.sh"  # resolves afresh, to write the file
    }
    found = [(name, line) for name, lines in installs.items() for line in lines]
    assert {name for name, _ in found} >= {"test.sh", "quickstart.sh", "gpu-check.sh"}, found
    for name, line in found:
        assert "--constraint constraints.txt" in line, f"scripts/{name}: {line}"
    dockerfile = (REPO / "Dockerfile").read_text()
    wheel_installs = re.findall(r"pip install[^\n]*\n?[^\n]*clickrank-\*\.whl", dockerfile)
    assert len(wheel_installs) == 2, wheel_installs  # the CPU and the GPU venv
    for install in wheel_installs:
        assert "--constraint=/wheels/constraints.txt" in install, install
    assert "cp constraints.txt /wheels/" in dockerfile
