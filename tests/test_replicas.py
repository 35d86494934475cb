"""Read replicas: ``Database(primary_url, replicas=[...])`` and ``db.read_session``,
against a real streaming replica.

The module starts a hot standby of the session's PostgreSQL server with
``pg_basebackup -R`` (or of a primary of its own, when the session's server is an
external ``TEST_DATABASE_URL``).  Each test gets a fresh database, created on the
primary with a seeded ``items`` row and replayed on the standby before the test runs.
``pg_is_in_recovery()`` tells which server answered a query: true on the standby.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
import pytest
from sqlalchemy import URL, func, insert, select, text, update

from asgi_sqla import Database, RequestStats, SessionEndedError, SQLAlchemyMiddleware
from asgi_sqla.types import ASGIApp, Message, Receive, Scope, Send

import _postgres
from _helpers import (
    add_key,
    call_http,
    checked_out,
    items,
    keys,
    plain_response,
    postgres_unavailable,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgresql]

IN_RECOVERY = text("SELECT pg_is_in_recovery()")


@dataclass
class Replication:
    primary: URL  # admin URL of the primary server
    standby: _postgres.StreamingReplica
    databases: _postgres.DatabaseFactory  # creates databases on the primary


@pytest.fixture(scope="module")
def replication(postgres_server: URL) -> Iterator[Replication]:
    """A streaming standby of the session's server, for this module."""
    bindir = _postgres.find_bindir()
    if bindir is None:
        postgres_unavailable("no PostgreSQL server binaries to start a streaming replica")
    assert bindir is not None
    own_primary: _postgres.TemporaryCluster | None = None
    primary = postgres_server
    if os.environ.get("TEST_DATABASE_URL"):  # not ours to copy: start a primary of our own
        own_primary = _postgres.TemporaryCluster(bindir)
        primary = own_primary.start()
    standby = _postgres.StreamingReplica(bindir, primary)
    factory = _postgres.DatabaseFactory(primary)
    try:
        try:
            standby.start()
        except _postgres.PostgresUnavailable as error:  # no pg_basebackup
            postgres_unavailable(str(error))
        yield Replication(primary, standby, factory)
    finally:
        factory.close()
        standby.stop()
        if own_primary is not None:
            own_primary.stop()


@dataclass
class Pair:
    primary: URL  # this test's database on the primary (driver-less)
    replica: URL  # the same database on the standby


@pytest.fixture
def pair(replication: Replication) -> Iterator[Pair]:
    """A fresh database on the primary, with ``items`` holding 'seeded', replayed on the standby."""
    database = replication.databases.create()
    try:
        with _postgres.connect(database) as conn:
            conn.execute("CREATE TABLE items (id serial PRIMARY KEY, key varchar(64) UNIQUE)")
            conn.execute("INSERT INTO items (key) VALUES ('seeded')")
        standby = replication.standby.url.set(database=database.database)
        _postgres.wait_for_replay(replication.primary, replication.standby.url)
        yield Pair(database, standby)
    finally:
        replication.databases.drop(database)


@pytest.fixture(params=["asyncpg", "psycopg"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def with_driver(url: URL, driver: str) -> str:
    return url.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


def dead_url(driver: str) -> str:
    """A URL where nothing listens (a port just freed), like a replica that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"postgresql+{driver}://postgres@127.0.0.1:{port}/postgres"


@pytest.fixture
async def db(pair: Pair, driver: str) -> AsyncIterator[Database]:
    database = Database(
        with_driver(pair.primary, driver), replicas=[with_driver(pair.replica, driver)]
    )
    try:
        yield database
    finally:
        await database.dispose()


def pools(db: Database) -> list[int]:
    """Checked-out connections of the primary's pool, then of each replica's."""
    replica_pools = [int(e.sync_engine.pool.checkedout()) for e in db.replica_engines]  # type: ignore[attr-defined]
    return [checked_out(db), *replica_pools]


def replica_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "asgi_sqla" and r.levelno == logging.WARNING and "replica" in r.getMessage()
    ]


@asynccontextmanager
async def running_lifespan(app: ASGIApp) -> AsyncIterator[list[Message]]:
    """Run ``app``'s lifespan: startup on entry, shutdown on exit; yields what it sends."""
    sent: list[Message] = []
    incoming: list[Message] = [{"type": "lifespan.startup"}]
    answered = anyio.Event()
    shutdown = anyio.Event()

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        await shutdown.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message: Message) -> None:
        sent.append(message)
        answered.set()

    async def run() -> None:
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        with anyio.fail_after(10):
            await answered.wait()
        try:
            yield sent
        finally:
            shutdown.set()


async def read_where(db: Database) -> bool:
    """Through ``db.read_session``: is the server that answers a standby?"""
    return bool(await db.read_session.scalar(IN_RECOVERY))


async def test_read_session_reads_on_the_replica_and_session_on_the_primary(
    db: Database,
) -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen["read on standby"] = await read_where(db)
        seen["read keys"] = list(await db.read_session.scalars(select(items.c.key)))
        seen["session on standby"] = await db.session.scalar(IN_RECOVERY)
        await plain_response(send, 200)

    async def on_send(message: Any) -> None:
        if message["type"] == "http.response.start":
            seen["pools at start"] = pools(db)

    recorder = await call_http(SQLAlchemyMiddleware(app, db), on_send=on_send)

    assert recorder.status == 200
    assert seen == {
        "read on standby": True,
        "read keys": ["seeded"],
        "session on standby": False,
        "pools at start": [0, 0],  # both sessions ended before the status line went out
    }


async def test_writes_go_to_the_primary_and_reach_the_replica(
    db: Database, pair: Pair, replication: Replication
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_where(db)
        await add_key(db, "written")
        await plain_response(send, 201)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 201
    assert await keys(db) == {"seeded", "written"}  # on the primary
    _postgres.wait_for_replay(replication.primary, replication.standby.url)
    with _postgres.connect(pair.replica) as standby:
        replicated = {row[0] for row in standby.execute("SELECT key FROM items")}
    assert replicated == {"seeded", "written"}


async def test_a_select_that_writes_through_a_cte_sends_the_later_reads_to_the_primary(
    db: Database,
) -> None:
    # WITH ins AS (INSERT ... RETURNING key) SELECT ins.key FROM ins: a SELECT that writes.
    inserted = insert(items).values(key="cte").returning(items.c.key).cte("ins")
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen["inserted"] = await db.session.scalar(select(inserted.c.key))
        seen["read_session is session"] = db.read_session is db.session
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert seen == {"inserted": "cte", "read_session is session": True}
    assert pools(db) == [0, 0]


async def test_after_a_write_the_request_reads_its_own_writes_on_the_primary(
    db: Database,
) -> None:
    seen: dict[str, Any] = {}
    mine = select(func.count()).select_from(items).where(items.c.key == "mine")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        earlier = db.read_session
        seen["before the write"] = await read_where(db)
        await add_key(db, "mine")  # not committed yet
        seen["read_session is session"] = db.read_session is db.session
        seen["sees its write"] = await db.read_session.scalar(mine)
        # A reference taken before the write follows it to the primary too.
        seen["earlier reference sees it"] = await earlier.scalar(mine)
        seen["earlier reference on standby"] = await earlier.scalar(IN_RECOVERY)
        await db.release()  # committed; the replica may not have replayed it yet
        seen["after release, on standby"] = await read_where(db)
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert seen == {
        "before the write": True,
        "read_session is session": True,
        "sees its write": 1,
        "earlier reference sees it": 1,
        "earlier reference on standby": False,
        "after release, on standby": False,
    }
    assert pools(db) == [0, 0]

    # Read-your-writes lasts for one request: the next one reads on the replica again.
    async def next_request(scope: Scope, receive: Receive, send: Send) -> None:
        seen["next request on standby"] = await read_where(db)
        await plain_response(send, 200)

    await call_http(SQLAlchemyMiddleware(next_request, db))
    assert seen["next request on standby"] is True


async def test_select_for_update_through_read_session_locks_in_the_primary_transaction(
    db: Database, pair: Pair
) -> None:
    seen: dict[str, Any] = {}
    seeded = items.c.key == "seeded"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        locked = await db.read_session.execute(select(items.c.id).where(seeded).with_for_update())
        seen["rows"] = len(locked.all())
        with _postgres.connect(pair.primary) as other:  # another client tries to lock the row
            try:
                other.execute("SELECT id FROM items WHERE key = 'seeded' FOR UPDATE NOWAIT")
            except psycopg.errors.LockNotAvailable:
                seen["row locked on the primary"] = True
        seen["read_session is session"] = db.read_session is db.session
        # Same transaction as the lock: no waiting on ourselves.
        await db.session.execute(update(items).where(seeded).values(key="updated"))
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert seen == {"rows": 1, "row locked on the primary": True, "read_session is session": True}
    assert await keys(db) == {"updated"}
    assert pools(db) == [0, 0]


async def test_a_replica_that_does_not_answer_is_skipped_for_one_that_does(
    pair: Pair, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    down = dead_url(driver)
    db = Database(
        with_driver(pair.primary, driver), replicas=[down, with_driver(pair.replica, driver)]
    )
    answers: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        answers.append(await read_where(db))
        await plain_response(send, 200)

    try:
        for _ in range(4):
            assert (await call_http(SQLAlchemyMiddleware(app, db))).status == 200
        assert pools(db) == [0, 0, 0]
    finally:
        await db.dispose()

    assert answers == [True, True, True, True]  # every read served by the live standby
    warnings = replica_warnings(caplog)
    assert len(warnings) == 1, warnings  # tried once, then left out for replica_cooldown
    assert down.split("@")[1].split("/")[0] in warnings[0]


async def test_a_replica_down_at_startup_is_a_warning_and_replicas_close_at_shutdown(
    pair: Pair, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    down = dead_url(driver)
    db = Database(
        with_driver(pair.primary, driver), replicas=[down, with_driver(pair.replica, driver)]
    )
    answers: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        answers.append(await read_where(db))
        await plain_response(send, 200)

    middleware = SQLAlchemyMiddleware(app, db)
    try:
        async with running_lifespan(middleware) as lifespan:
            assert [m["type"] for m in lifespan] == ["lifespan.startup.complete"]
            assert len(replica_warnings(caplog)) == 1  # at startup, naming the one down
            for _ in range(2):
                await call_http(middleware)
            with _postgres.connect(pair.replica) as standby:
                serving = standby.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()"
                ).fetchone()
    finally:
        await db.dispose()

    assert answers == [True, True]
    assert [m["type"] for m in lifespan] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert serving == (1,)  # one pooled connection while running...
    with _postgres.connect(pair.replica) as standby:
        left = standby.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchone()
    assert left == (0,)  # ...closed at shutdown


async def test_a_replica_stopped_while_serving_is_skipped_and_used_again_once_back(
    db: Database,
    pair: Pair,
    driver: str,
    replication: Replication,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = Database(
        with_driver(pair.primary, driver),
        replicas=[with_driver(pair.replica, driver)],
        replica_cooldown=0,  # try it again at once: this test restarts it
    )
    answers: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        answers.append(await read_where(db))
        answers.append(bool(await db.read_session.scalar(select(func.count()).select_from(items))))
        await plain_response(send, 200)

    middleware = SQLAlchemyMiddleware(app, db)
    try:
        assert (await call_http(middleware)).status == 200  # leaves a pooled replica connection
        replication.standby.pause()
        try:
            assert (await call_http(middleware)).status == 200
        finally:
            replication.standby.resume()
        assert (await call_http(middleware)).status == 200
        assert pools(db) == [0, 0]
    finally:
        await db.dispose()

    # Standby; then the primary (the pooled connection was dead: the read session's
    # first statement failed over, and there is no other replica); then the standby.
    assert answers == [True, True, False, True, True, True]
    warnings = replica_warnings(caplog)
    assert len(warnings) == 1, warnings


async def test_release_ends_the_read_session_too(db: Database) -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        read = db.read_session
        await read.scalar(IN_RECOVERY)
        await db.release()
        try:
            await read.scalar(IN_RECOVERY)
        except SessionEndedError:
            seen["stale read session"] = "ended"
        seen["new read session"] = db.read_session is not read
        await plain_response(send, 200)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert seen == {"stale read session": "ended", "new read session": True}
    assert pools(db) == [0, 0]


async def test_without_replicas_read_session_is_the_session(postgresql_url: str) -> None:
    db = Database(postgresql_url)
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen["same"] = db.read_session is db.session
        await plain_response(send, 200)

    try:
        await call_http(SQLAlchemyMiddleware(app, db))
    finally:
        await db.dispose()
    assert seen == {"same": True}
    assert db.replica_engines == ()


# -- statistics --------------------------------------------------------------------------


async def warmed_up(db: Database) -> Database:
    """``db`` with its engines connected once: a first connection runs the dialect's own
    statements, which no request should be charged for."""
    for engine in (db.engine, *db.replica_engines):
        async with engine.connect():
            pass
    return db


def server_timing_of(recorder: Any) -> str:
    start = next(m for m in recorder.sent if m["type"] == "http.response.start")
    [value] = [v.decode() for k, v in start["headers"] if k == b"server-timing"]
    return str(value)


async def test_statistics_count_replica_statements_apart_from_the_primary(
    pair: Pair, driver: str
) -> None:
    db = Database(
        with_driver(pair.primary, driver), replicas=[with_driver(pair.replica, driver)], stats=True
    )
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen["stats"] = db.stats
        await read_where(db)
        await db.read_session.scalars(select(items.c.key))
        await db.session.scalar(IN_RECOVERY)
        await add_key(db, "written")  # from here on, reads go to the primary
        await read_where(db)
        seen["before the end"] = dataclasses.replace(db.stats or RequestStats())
        await plain_response(send, 201)

    try:
        await warmed_up(db)
        recorder = await call_http(SQLAlchemyMiddleware(app, db, server_timing=True))
    finally:
        await db.dispose()

    assert recorder.status == 201
    before, stats = seen["before the end"], seen["stats"]
    assert (before.statements, before.replica_statements) == (3, 2)
    assert before.duration > 0
    assert before.replica_duration > 0
    assert stats.all_statements == 5
    assert stats.held > 0  # both connections went back, and were timed
    assert stats.replica_held > 0
    assert re.fullmatch(
        r'db;dur=[\d.]+;desc="3 queries, 5 round trips", '
        r'db-replica;dur=[\d.]+;desc="2 queries, 4 round trips"',
        server_timing_of(recorder),
    )


async def test_a_read_that_fell_back_to_the_primary_is_counted_on_the_primary(
    pair: Pair, driver: str
) -> None:
    db = Database(with_driver(pair.primary, driver), replicas=[dead_url(driver)], stats=True)
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen["on standby"] = await read_where(db)
        seen["stats"] = db.stats
        await plain_response(send, 200)

    try:
        async with db.engine.connect():  # warm up the primary (the replica never answers)
            pass
        recorder = await call_http(SQLAlchemyMiddleware(app, db, server_timing=True))
    finally:
        await db.dispose()

    stats = seen["stats"]
    assert seen["on standby"] is False
    assert (stats.statements, stats.replica_statements, stats.replica_held) == (1, 0, 0.0)
    assert re.fullmatch(r'db;dur=[\d.]+;desc="1 query, 3 round trips"', server_timing_of(recorder))


async def test_the_statement_warning_counts_the_replicas_statements(
    pair: Pair, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(
        with_driver(pair.primary, driver),
        replicas=[with_driver(pair.replica, driver)],
        warn_statements_over=2,
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for _ in range(3):  # an N+1 pattern, on the replica
            await read_where(db)
        await plain_response(send, 200)

    caplog.set_level(logging.DEBUG, logger="asgi_sqla")
    try:
        await warmed_up(db)
        await call_http(SQLAlchemyMiddleware(app, db))
    finally:
        await db.dispose()

    [warning] = [r for r in caplog.records if "N+1" in r.getMessage()]
    assert "sent 3 statements to" in warning.getMessage()
    assert "3 of them to its read replicas (more than 2)" in warning.getMessage()
    assert getattr(warning, "replica_statements", None) == 3
    [summary] = [r for r in caplog.records if r.levelno == logging.DEBUG and "/:" in r.getMessage()]
    assert ": 0 statements, " in summary.getMessage()
    assert "; read replicas: 3 statements, " in summary.getMessage()


async def test_server_timing_instruments_replica_engines_made_before_the_middleware(
    pair: Pair, driver: str
) -> None:
    db = Database(with_driver(pair.primary, driver), replicas=[with_driver(pair.replica, driver)])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_where(db)
        await plain_response(send, 200)

    try:
        await warmed_up(db)  # engines made while statistics are off
        recorder = await call_http(SQLAlchemyMiddleware(app, db, server_timing=True))
    finally:
        await db.dispose()

    assert re.fullmatch(
        r'db;dur=0\.0;desc="0 queries, 0 round trips", '
        r'db-replica;dur=[\d.]+;desc="1 query, 3 round trips"',
        server_timing_of(recorder),
    )


async def test_a_replica_connection_held_too_long_warns_on_its_own(
    pair: Pair, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(
        with_driver(pair.primary, driver),
        replicas=[with_driver(pair.replica, driver)],
        warn_held_over=0,
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_where(db)  # the primary is not used: it held nothing
        await plain_response(send, 200)

    try:
        with caplog.at_level(logging.WARNING, logger="asgi_sqla"):
            await call_http(SQLAlchemyMiddleware(app, db), "/report")
    finally:
        await db.dispose()

    messages = [r.getMessage() for r in caplog.records if r.name == "asgi_sqla"]
    assert len(messages) == 1, messages
    assert messages[0].startswith("GET /report held a read replica connection of Database(")
