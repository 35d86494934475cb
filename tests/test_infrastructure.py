"""The test fixtures themselves: real servers, fresh databases, async drivers."""

from __future__ import annotations

import textwrap
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import TupleRow
from sqlalchemy import URL, inspect, make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

import _postgres


def test_postgres_server_answers(postgres_server: URL) -> None:
    assert postgres_server.drivername == "postgresql"
    with _postgres.connect(postgres_server) as conn:
        version = conn.execute("SHOW server_version_num").fetchone()
        database = conn.execute("SELECT current_database()").fetchone()
    assert version is not None
    assert int(version[0]) >= 130000  # DROP DATABASE ... WITH (FORCE) needs 13
    assert database == (postgres_server.database,)


@pytest.mark.anyio
async def test_round_trip_through_async_engine(database_url: str) -> None:
    url = make_url(database_url)
    engine = create_async_engine(url)
    try:
        assert engine.dialect.is_async
        assert engine.dialect.driver == url.get_driver_name()
        async with engine.begin() as conn:
            await conn.execute(
                text("CREATE TABLE items (id INTEGER PRIMARY KEY, name VARCHAR(50) NOT NULL)")
            )
            await conn.execute(
                text("INSERT INTO items (id, name) VALUES (:id, :name)"),
                [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
            )
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT id, name FROM items ORDER BY id"))).all()
        assert [tuple(row) for row in rows] == [(1, "one"), (2, "two")]
    finally:
        await engine.dispose()


_seen_databases: set[str] = set()


@pytest.mark.anyio
@pytest.mark.parametrize("run", [1, 2])
async def test_every_test_gets_its_own_empty_database(database_url: str, run: int) -> None:
    # Runs twice per backend; a database shared with an earlier test would still hold the
    # table created below, or its URL would repeat.
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            tables = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
            assert tables == []
            await conn.execute(text(f"CREATE TABLE leftover_{run} (id INTEGER PRIMARY KEY)"))
    finally:
        await engine.dispose()
    assert database_url not in _seen_databases
    _seen_databases.add(database_url)


@pytest.mark.anyio
async def test_pg_admin_watches_the_test_database(
    postgresql_url: str, pg_admin: psycopg.Connection[TupleRow]
) -> None:
    url = make_url(postgresql_url)
    assert pg_admin.execute("SELECT current_database()").fetchone() == (url.database,)
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            pid = await conn.scalar(text("SELECT pg_backend_pid()"))
            activity = pg_admin.execute(
                "SELECT datname FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            assert activity == (url.database,)
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("ci", "skipped", "errors"),
    [pytest.param("", 2, 0, id="local"), pytest.param("true", 0, 2, id="ci")],
)
def test_missing_postgres_skips_locally_and_fails_on_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, skipped: int, errors: int
) -> None:
    tests = Path(__file__).parent
    pytester.makeconftest((tests / "conftest.py").read_text())
    pytester.makepyfile(_postgres=(tests / "_postgres.py").read_text())
    pytester.makepyfile(_mariadb=(tests / "_mariadb.py").read_text())
    pytester.makepyfile(_helpers=(tests / "_helpers.py").read_text())
    pytester.makepyfile(
        test_inner=textwrap.dedent(
            """
            def test_database(database_url):
                assert database_url
            """
        )
    )
    monkeypatch.delenv("TEST_DATABASE_URL", raising=False)
    monkeypatch.setenv(_postgres.BINDIR_VARIABLE, str(pytester.mkdir("no-postgres-here")))
    monkeypatch.setenv("CI", ci)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-ra")
    result.assert_outcomes(passed=1, skipped=skipped, errors=errors)
    expected = "*CI is set, so PostgreSQL tests must not be skipped*" if ci else "*unavailable*"
    result.stdout.fnmatch_lines([expected])
