"""The version matrix: the test suite on every Python and every dependency range it claims.

``make test-matrix`` runs every session; ``nox -l`` lists them; ``nox -s "tests-3.11(lowest)"``
runs one.  Each session is a cell: a Python version and a *corner* of the dependency ranges
declared in pyproject.toml (the package's ``dependencies`` and the test part of the ``dev``
group; the tools, ruff, mypy and its type stubs, import-linter, coverage, nox and uv, are
left out):

- ``lowest``: every lower bound at once (``name>=X`` installed as ``name==X``), the oldest
  set a user may have; only the packages those pins pull in are resolved to their newest.
- ``newest``: every range resolved to its newest release.
- ``sqla-lowest`` and ``sqla-newest`` (newest Python only): SQLAlchemy at one end and
  everything else at the other, so that SQLAlchemy's two ends meet both ends of the rest.

Each cell runs the whole suite, SQLite and PostgreSQL (the suite starts its own server), with
``CI=true`` so that a PostgreSQL test skipped is a failure.  A Python version that cannot be
found (on ``PATH`` as ``python3.X``, or under pyenv's ``versions/``) is reported as skipped,
not failed.  Installs go through uv: from a clean checkout only python3 and the package
registries are needed.  docs/versions.md records the last results.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import nox
from packaging.requirements import Requirement

ROOT = Path(__file__).parent
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
NEWEST_PYTHON = PYTHONS[-1]
#: Tools of the dev group that the test run does not import: the checkers, the type stubs
#: mypy reads (django-stubs 6.1 needs Python 3.11), and the matrix's own tools.
TOOLS = {"coverage", "ruff", "mypy", "import-linter", "django-stubs", "types-PyMySQL", "nox", "uv"}

nox.options.default_venv_backend = "uv"
# The interpreters are the machine's: uv must not download one of its own.
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
# nox fails on a missing interpreter when CI is set (its default since 2024): the Python axis
# reports what it cannot find instead; .ci/run runs its corner on the interpreter it has.
nox.options.error_on_missing_interpreters = False
nox.options.reuse_venv = "yes"


def _add_pyenv_interpreters() -> None:
    """Put pyenv's interpreters on ``PATH``, where nox looks for ``python3.X``."""
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    # The newest patch release of each minor version last, so that it comes first on PATH.
    found = sorted(
        versions.glob("3.*/bin"), key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)]
    )
    dirs = [str(p) for p in reversed(found)]
    os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), *dirs])


_add_pyenv_interpreters()


def _requirements() -> list[Requirement]:
    project = nox.project.load_toml(ROOT / "pyproject.toml")
    declared = [*project["project"]["dependencies"], *project["dependency-groups"]["dev"]]
    # {include-group = "docs"}: the site's tools, which the test suite does not use.
    requirements = [Requirement(d) for d in declared if isinstance(d, str)]
    return [r for r in requirements if r.name not in TOOLS]


def _lower_bound(requirement: Requirement) -> str:
    bounds = [s.version for s in requirement.specifier if s.operator == ">="]
    if len(bounds) != 1:
        raise ValueError(f"{requirement} needs exactly one '>=' bound for the lowest corner")
    return bounds[0]


def _pinned(requirement: Requirement) -> str:
    """``name[extras]==lower`` with the requirement's marker kept."""
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    marker = f"; {requirement.marker}" if requirement.marker else ""
    return f"{requirement.name}{extras}=={_lower_bound(requirement)}{marker}"


def _corner(name: str) -> list[str]:
    """The requirements of one corner, as uv pip install arguments."""
    lowest = name == "lowest" or name == "sqla-newest"
    specs: list[str] = []
    for requirement in _requirements():
        at_lowest = (
            lowest if requirement.name != "sqlalchemy" else name in {"lowest", "sqla-lowest"}
        )
        specs.append(_pinned(requirement) if at_lowest else str(requirement))
    return specs


def _run_suite(session: nox.Session, specs: Iterable[str]) -> None:
    session.install("-e", ".", *specs)
    session.run(
        "uv", "pip", "list", "--python", session.virtualenv.location, silent=False, external=True
    )
    session.run(
        "python", "-m", "pytest", "-p", "no:cacheprovider", *session.posargs, env={"CI": "true"}
    )


@nox.session(python=PYTHONS)
@nox.parametrize("corner", ["lowest", "newest"], ids=["lowest", "newest"])
def tests(session: nox.Session, corner: str) -> None:
    """The suite with every dependency at its lower bound, or at its newest release."""
    _run_suite(session, _corner(corner))


@nox.session(python=[NEWEST_PYTHON])
@nox.parametrize("corner", ["sqla-lowest", "sqla-newest"], ids=["sqla-lowest", "sqla-newest"])
def sqlalchemy(session: nox.Session, corner: str) -> None:
    """SQLAlchemy at its lower bound with the rest newest, and the other way round."""
    _run_suite(session, _corner(corner))
