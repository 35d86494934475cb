"""PgBouncer in transaction pooling mode, in front of the session's PostgreSQL server.

In transaction mode PgBouncer gives a client a server connection for one transaction
only: the next transaction may run on another one.  A prepared statement lives on the
server connection that prepared it, so a driver that reuses prepared statements across
transactions fails ("prepared statement ... does not exist"), or collides with another
client's statement of the same name ("... already exists").  These tests run the
settings documented for each driver (``PGBOUNCER_CONNECT_ARGS``) through a real
PgBouncer from the system packages, and show that the drivers' defaults fail there.

Skipped, with the reason shown, when no ``pgbouncer`` binary is found (``apt-get install
pgbouncer``, or ``TEST_PGBOUNCER=/path/to/pgbouncer``); under ``CI`` that is a failure.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _pgbouncer
import anyio
import pytest
from sqlalchemy import URL, exc, func, select, text

from asgi_sqla import Database, SQLAlchemyMiddleware
from asgi_sqla.types import Receive, Scope, Send

import _postgres
from _helpers import PoolEvents, call_http, checked_out, items, keys, plain_response

pytestmark = [pytest.mark.anyio, pytest.mark.postgresql]

#: What docs/guides/pgbouncer.md documents (checked below) for PgBouncer's transaction (or
#: statement) pooling mode.
PGBOUNCER_CONNECT_ARGS: dict[str, dict[str, Any]] = {
    # asyncpg: no statement cache, so every statement is an unnamed one, parsed again in
    # each transaction; SQLAlchemy's cache of prepared statements off too.
    "asyncpg": {"statement_cache_size": 0, "prepared_statement_cache_size": 0},
    # psycopg: never prepare (by default a query run 5 times on a connection is).
    "psycopg": {"prepare_threshold": None},
}

#: The same query, run this many times per request: past psycopg's prepare threshold.
REPEATS = 6


GUIDE = Path(__file__).resolve().parent.parent / "docs/guides/pgbouncer.md"


def test_the_guide_shows_the_settings_tested_here() -> None:
    page = GUIDE.read_text()
    for settings in PGBOUNCER_CONNECT_ARGS.values():
        for name, value in settings.items():
            assert re.search(rf'"{name}": {value!r}\b', page), (
                f"{GUIDE.name} lacks {name}={value!r}"
            )


def pgbouncer_unavailable(reason: str) -> None:
    if os.environ.get("CI", "").strip().lower() in {"true", "1"}:
        pytest.fail(f"{reason}; CI is set, so PgBouncer tests must not be skipped", pytrace=False)
    pytest.skip(f"PgBouncer unavailable: {reason}")


@dataclass
class Bouncer:
    process: _pgbouncer.PgBouncer
    database: URL  # the database behind it, direct (driver-less)
    server: str  # how PgBouncer reaches it: "host=... port=... dbname=..."

    def url(self, alias: str, driver: str) -> str:
        """Async URL of database alias ``alias`` through PgBouncer."""
        return URL.create(
            f"postgresql+{driver}",
            username="postgres",
            host="127.0.0.1",
            port=self.process.port,
            database=alias,
        ).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def bouncer(_postgres_databases: _postgres.DatabaseFactory) -> Iterator[Bouncer]:
    """PgBouncer (transaction pooling) in front of a database made for this module.

    Aliases: ``app`` (3 server connections) for the load tests, ``pair`` (2) for the
    tests that need a statement to move from one server connection to the other.
    """
    binary = _pgbouncer.find_pgbouncer()
    if binary is None:
        override = os.environ.get(_pgbouncer.BINARY_VARIABLE)
        pgbouncer_unavailable(
            f"{_pgbouncer.BINARY_VARIABLE}={override} is not an executable"
            if override
            else "no pgbouncer binary on PATH or in /usr/sbin (apt-get install pgbouncer)"
        )
    assert binary is not None
    database = _postgres_databases.create()
    with _postgres.connect(database) as conn:
        conn.execute("CREATE TABLE items (id serial PRIMARY KEY, key varchar(64) UNIQUE)")
    server = f"host={database.host} port={database.port} dbname={database.database}"
    if database.username:
        server += f" user={database.username}"
    if database.password:
        server += f" password={database.password}"
    process = _pgbouncer.PgBouncer(
        binary, {"app": f"{server} pool_size=3", "pair": f"{server} pool_size=2"}
    )
    try:
        process.start()
    except _pgbouncer.PgBouncerUnavailable as error:
        _postgres_databases.drop(database)
        pgbouncer_unavailable(str(error))
    try:
        yield Bouncer(process, database, server)
    finally:
        process.stop()
        _postgres_databases.drop(database)


@pytest.fixture(params=["asyncpg", "psycopg"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def documented(bouncer: Bouncer, driver: str) -> AsyncIterator[Database]:
    """A ``Database`` through PgBouncer with the documented settings, a pool of 4."""
    db = Database(
        bouncer.url("app", driver),
        pool_size=4,
        max_overflow=0,
        connect_args=PGBOUNCER_CONNECT_ARGS[driver],
    )
    try:
        yield db
    finally:
        await db.dispose()


def server_connections(bouncer: Bouncer, alias: str) -> int:
    """Server connections PgBouncer has open for ``alias`` right now."""
    pools = [p for p in bouncer.process.show("POOLS") if p["database"] == alias]
    return sum(int(p[k]) for p in pools for k in ("sv_active", "sv_idle", "sv_used"))  # type: ignore[call-overload]


async def test_many_concurrent_requests_work_through_pgbouncer_with_the_documented_settings(
    documented: Database, bouncer: Bouncer, driver: str
) -> None:
    db = documented
    events = PoolEvents(db)
    statuses: list[int] = []
    counted: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        key = scope["path"].strip("/")
        await db.session.execute(items.insert().values(key=key))
        for _ in range(REPEATS):  # the same statement again and again, in one transaction
            found = select(func.count()).select_from(items).where(items.c.key == key)
            counted.append(int(await db.session.scalar(found) or 0))
        await plain_response(send, 201)

    middleware = SQLAlchemyMiddleware(app, db)
    requests = [f"{driver}-{n}" for n in range(24)]

    async def one(key: str) -> None:
        statuses.append((await call_http(middleware, f"/{key}")).status)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            for key in requests:
                group.start_soon(one, key)

    assert statuses == [201] * len(requests)
    assert counted == [1] * (len(requests) * REPEATS)
    assert {k for k in await keys(db) if k.startswith(f"{driver}-")} == set(requests)
    # 24 requests on at most 4 pooled client connections (reused, not reopened), and
    # their transactions spread over PgBouncer's 3 server connections.
    assert events.connects <= 4
    assert events.checkouts >= len(requests)
    assert checked_out(db) == 0
    assert 1 <= server_connections(bouncer, "app") <= 3


async def run_on_a_second_server_connection(bouncer: Bouncer, driver: str, **options: Any) -> int:
    """Run a statement in a transaction, then again after PgBouncer moved the client.

    Client A runs the statement ``REPEATS`` times, each in its own transaction: all on
    the alias's first server connection S1, the only one.  Client B then holds S1 in an
    open transaction, so A's next transaction runs on a second server connection S2;
    A runs the statement there once more and returns its result.
    """
    a = Database(bouncer.url("pair", driver), pool_size=1, max_overflow=0, **options)
    b = Database(bouncer.url("pair", driver), pool_size=1, max_overflow=0, **options)
    statement = text("SELECT count(*) + :n FROM items")
    try:
        for _ in range(REPEATS):
            async with a.scope() as session:
                await session.scalar(statement, {"n": 0})
        async with b.scope() as holder:
            await holder.execute(text("SELECT 1"))  # B's transaction now holds S1
            async with a.scope() as session:
                return int(await session.scalar(statement, {"n": 1}) or 0)
    finally:
        await a.dispose()
        await b.dispose()


async def test_with_the_documented_settings_a_statement_runs_on_any_server_connection(
    bouncer: Bouncer, driver: str
) -> None:
    result = await run_on_a_second_server_connection(
        bouncer, driver, connect_args=PGBOUNCER_CONNECT_ARGS[driver]
    )
    assert result >= 1


async def test_with_the_drivers_defaults_a_prepared_statement_fails_on_another_server_connection(
    bouncer: Bouncer, driver: str
) -> None:
    # asyncpg: SQLAlchemy's cache holds the statement prepared on S1; psycopg prepared
    # it on S1 after its 5th run.  Either way S2 has never heard of it.
    with pytest.raises(exc.DBAPIError, match=r"prepared statement \S+ does not exist"):
        await run_on_a_second_server_connection(bouncer, driver)


async def test_pgbouncer_tracking_prepared_statements_makes_the_defaults_work(
    bouncer: Bouncer, driver: str
) -> None:
    """PgBouncer 1.21+ with ``max_prepared_statements`` re-prepares statements as needed."""
    assert bouncer.process.binary is not None
    found = _pgbouncer.version(bouncer.process.binary)
    if found < (1, 21):
        pytest.skip(f"PgBouncer {found[0]}.{found[1]} is too old: max_prepared_statements is 1.21+")
    tracking = _pgbouncer.PgBouncer(
        bouncer.process.binary,
        {"pair": f"{bouncer.server} pool_size=2"},
        settings={"max_prepared_statements": "100"},
    )
    tracking.start()
    try:
        result = await run_on_a_second_server_connection(
            Bouncer(tracking, bouncer.database, bouncer.server), driver
        )
    finally:
        tracking.stop()
    assert result >= 1
