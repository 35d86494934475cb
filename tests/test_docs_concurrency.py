"""The Python blocks of ``docs/guides/concurrency.md`` and ``docs/guides/hooks.md`` run as written.

Each block names its file on its first line (``# per_task_app.py``); it is loaded as a
module with ``DATABASE_URL`` set to the test's database, and its app is called.
"""

from __future__ import annotations

import re
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from asgi_sqla import Database

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).resolve().parent.parent / "docs" / "guides"
PAGES = ("concurrency.md", "hooks.md")


def code_files(markdown: Path) -> dict[str, str]:
    """The ``python`` blocks of ``markdown``, by the file their first line names."""
    files: dict[str, str] = {}
    for block in re.findall(r"```python\n(.*?)```", markdown.read_text(), re.DOTALL):
        first_line = block.splitlines()[0]
        assert re.fullmatch(r"# \w+\.py", first_line), f"{markdown.name}: {first_line!r}"
        files[first_line[2:-3]] = block
    return files


BLOCKS = {name: block for page in PAGES for name, block in code_files(DOCS / page).items()}


def test_every_python_block_of_the_pages_is_run_below() -> None:
    assert sorted(BLOCKS) == [
        "audit_app",
        "new_session_app",
        "per_task_app",
        "wal_position_app",
    ]


@pytest.fixture
def load(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Loads a block as a module (its ``Database()`` reads ``DATABASE_URL``)."""
    monkeypatch.setenv("DATABASE_URL", database_url)

    def load_block(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        exec(compile(BLOCKS[name], f"docs/{name}.py", "exec"), module.__dict__)
        return module

    return load_block


@pytest.fixture
async def tables(database_url: str) -> AsyncIterator[Database]:
    """The tables the blocks use, with two users and three orders."""
    db = Database(database_url)
    async with db.engine.begin() as connection:
        for statement in (
            "CREATE TABLE users (id INTEGER PRIMARY KEY)",
            "CREATE TABLE orders (id INTEGER PRIMARY KEY)",
            "CREATE TABLE audit (orders INTEGER NOT NULL)",
            "INSERT INTO users (id) VALUES (1001), (1002)",
            "INSERT INTO orders (id) VALUES (1001), (1002), (1003)",
        ):
            await connection.execute(text(statement))
    try:
        yield db
    finally:
        await db.dispose()


async def scalar(db: Database, statement: str) -> Any:
    async with db.engine.connect() as connection:
        return await connection.scalar(text(statement))


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_per_task_app_reads_at_once_and_imports_with_release(
    load: Any, tables: Database
) -> None:
    module = load("per_task_app")
    try:
        async with client(module.app) as http:
            dashboard = await http.get("/dashboard")
            imported = await http.post("/import")
        assert dashboard.status_code == 200
        assert dashboard.json() == {"users": 2, "orders": 3}
        assert imported.status_code == 201
        assert await scalar(tables, "SELECT count(*) FROM orders") == 103
        assert module.db.pool_status().checked_out == 0
    finally:
        await module.db.dispose()


async def test_new_session_app_reads_at_once(load: Any, tables: Database) -> None:
    module = load("new_session_app")
    try:
        async with client(module.app) as http:
            dashboard = await http.get("/dashboard")
        assert dashboard.json() == {"users": 2, "orders": 3}
        assert module.db.pool_status().checked_out == 0
    finally:
        await module.db.dispose()


async def test_audit_app_commits_the_audit_row_with_the_order(load: Any, tables: Database) -> None:
    module = load("audit_app")
    try:
        async with client(module.app) as http:
            created = await http.post("/orders")
        assert created.status_code == 201
        assert await scalar(tables, "SELECT orders FROM audit") == 4
    finally:
        await module.db.dispose()


@pytest.mark.postgresql
async def test_wal_position_app_sends_the_position_of_the_writes(
    postgresql_url: str,
    postgres_database: Any,
    monkeypatch: pytest.MonkeyPatch,
    pg_admin: Any,
) -> None:
    monkeypatch.setenv("DATABASE_URL", postgresql_url)
    pg_admin.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    module = types.ModuleType("wal_position_app")
    exec(compile(BLOCKS["wal_position_app"], "docs/wal_position_app.py", "exec"), module.__dict__)
    try:
        async with client(module.app) as http:
            created = await http.post("/orders")
    finally:
        await module.db.dispose()

    assert created.status_code == 201
    lsn = created.headers["x-wal-lsn"]
    row = pg_admin.execute("SELECT %s::pg_lsn < pg_current_wal_insert_lsn()", (lsn,)).fetchone()
    assert row[0]  # before the commit record, which is behind the server's position now
    assert pg_admin.execute("SELECT count(*) FROM orders").fetchone()[0] == 1
