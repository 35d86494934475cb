"""What every example's tests share: a database of each test's own.

The example apps read ``DATABASE_URL`` when they start, with a default file of their
own (``./starlette_example.db``...) that ``make run`` serves.  The tests never touch
it: each test gets a new SQLite file under its ``tmp_path``, unless
``EXAMPLES_DATABASE_URL`` names the database to test on (PostgreSQL, say), which
the tests then share.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def sqlite_driver() -> str:
    """The SQLAlchemy driver of the example's SQLite URL: ``sqlite`` for a SyncDatabase."""
    return "sqlite+aiosqlite"


@pytest.fixture(autouse=True)
def database_url(sqlite_driver: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The URL the example app starts on, set as its ``DATABASE_URL`` for this test."""
    url = os.environ.get("EXAMPLES_DATABASE_URL") or f"{sqlite_driver}:///{tmp_path / 'notes.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    return url
