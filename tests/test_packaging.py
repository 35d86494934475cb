"""The package's metadata: one version, and the Python versions it claims are the ones tested."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import asgi_sqla

ROOT = Path(__file__).parent.parent


def _pyproject() -> dict[str, object]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is new in Python 3.11")
    with open(ROOT / "pyproject.toml", "rb") as f:
        project: dict[str, object] = tomllib.load(f)["project"]
    return project


def _matrix_pythons() -> list[str]:
    """``PYTHONS`` of noxfile.py, read without importing nox (not a test dependency)."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "PYTHONS":
            pythons: list[str] = ast.literal_eval(node.value)
            return pythons
    raise AssertionError("noxfile.py assigns no PYTHONS")


def test_the_version_is_the_one_written_in_pyproject() -> None:
    assert asgi_sqla.__version__ == _pyproject()["version"]


def test_the_python_classifiers_are_the_versions_the_matrix_runs() -> None:
    project = _pyproject()
    prefix = "Programming Language :: Python :: "
    claimed = [
        c.removeprefix(prefix)
        for c in project["classifiers"]  # type: ignore[attr-defined]
        if c.startswith(prefix + "3.")
    ]

    pythons = _matrix_pythons()
    assert sorted(claimed, key=_as_tuple) == sorted(pythons, key=_as_tuple) == pythons
    assert project["requires-python"] == f">={pythons[0]}"


def test_the_license_is_mit_and_shipped() -> None:
    project = _pyproject()

    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def _as_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))
