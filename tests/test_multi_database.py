"""One request, several databases: commit order, a commit that fails after another
succeeded, and two-phase commit (``SQLAlchemyMiddleware(app, db1, db2, two_phase=True)``).

Every test uses real PostgreSQL databases: fresh ones on the session's server, each with
the ``items`` table and a deferred foreign key (``orphan_child``) whose violation is
only found at COMMIT (or at PREPARE TRANSACTION).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow
from sqlalchemy import URL, event, text

from asgi_sqla import ConfigurationError, Database, SQLAlchemyMiddleware
from asgi_sqla.types import Receive, Scope, Send

import _postgres
from _helpers import (
    add_key,
    call_http,
    checked_out,
    keys,
    orphan_child,
    plain_response,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgresql]


@pytest.fixture(params=["asyncpg", "psycopg"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


#: The tables of ``_helpers``: ``items``, and a deferred foreign key (``orphan_child``).
_TABLES = (
    "CREATE TABLE items (id serial PRIMARY KEY, key varchar(64) NOT NULL UNIQUE)",
    "CREATE TABLE parents (id integer PRIMARY KEY)",
    "CREATE TABLE children (id integer PRIMARY KEY, parent_id integer NOT NULL "
    "REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)",
)


@pytest.fixture(scope="module")
def module_databases(_postgres_databases: _postgres.DatabaseFactory) -> Iterator[list[URL]]:
    """Three PostgreSQL databases on the session's server for this module, with the tables."""
    urls = [_postgres_databases.create() for _ in range(3)]
    try:
        for url in urls:
            with _postgres.connect(url) as conn:
                for statement in _TABLES:
                    conn.execute(statement)
        yield urls
    finally:
        for url in urls:
            _postgres_databases.drop(url)


@pytest.fixture
def database_urls(module_databases: list[URL]) -> Iterator[list[URL]]:
    """The three databases (driver-less URLs), emptied after the test."""
    try:
        yield module_databases
    finally:
        for url in module_databases:
            with _postgres.connect(url) as conn:
                # A failed test must not leave a prepared transaction holding locks.
                gids = conn.execute(
                    "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
                ).fetchall()
                for (gid,) in gids:
                    conn.execute(f"ROLLBACK PREPARED '{gid}'")
                conn.execute("TRUNCATE items, children, parents")


@pytest.fixture
async def dbs(driver: str, database_urls: list[URL]) -> AsyncIterator[list[Database]]:
    """A ``Database`` on each of the three databases, with ``items`` and ``children``."""
    opened = [
        Database(url.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False))
        for url in database_urls
    ]
    try:
        yield opened
    finally:
        for db in opened:
            await db.dispose()


@pytest.fixture
def server_admin(postgres_server: URL) -> Iterator[psycopg.Connection[TupleRow]]:
    """An autocommit connection to the server's admin database, to see prepared transactions."""
    conn = _postgres.connect(postgres_server)
    try:
        yield conn
    finally:
        conn.close()


def prepared_transactions(admin: psycopg.Connection[TupleRow], *dbs: Database) -> list[str]:
    """The gids of transactions left prepared in the databases of ``dbs``."""
    names = [db.engine.url.database for db in dbs]
    rows = admin.execute(
        "SELECT gid FROM pg_prepared_xacts WHERE database = ANY(%s)", (names,)
    ).fetchall()
    return [str(row[0]) for row in rows]


async def children(db: Database) -> int:
    async with db.engine.connect() as connection:
        return int((await connection.scalar(text("SELECT count(*) FROM children"))) or 0)


def record_events(db: Database, name: str, log: list[str], *events: str) -> None:
    """Append ``name:event`` to ``log`` whenever ``db``'s engine fires one of ``events``.

    ``commit_twophase`` (the commit of a session begun as two-phase) is logged as
    ``commit_prepared`` or ``commit_one_phase``, after its ``is_prepared`` argument.
    """
    for event_name in events:

        def listener(*args: Any, _event: str = event_name) -> None:
            if _event == "commit_twophase":
                _event = "commit_prepared" if args[2] else "commit_one_phase"
            log.append(f"{name}:{_event}")

        event.listen(db.engine.sync_engine, event_name, listener)


def asgi_sqla_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "asgi_sqla" and r.levelno >= logging.ERROR
    ]


def app_doing(*steps: Callable[[], Any], status: int = 200) -> Any:
    """An ASGI app that awaits each step in order, then answers ``status``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for step in steps:
            await step()
        await plain_response(send, status, b"done")

    return app


# -- without two-phase commit ----------------------------------------------------------


async def test_a_request_writing_to_two_databases_commits_both_before_the_status_line(
    dbs: list[Database],
) -> None:
    first, second, _ = dbs
    seen_at_start: list[tuple[set[str], set[str]]] = []

    async def on_send(message: Any) -> None:
        if message["type"] == "http.response.start":
            seen_at_start.append((await keys(first), await keys(second)))

    app = app_doing(lambda: add_key(first, "one"), lambda: add_key(second, "two"))
    recorder = await call_http(SQLAlchemyMiddleware(app, first, second), on_send=on_send)

    assert recorder.status == 200
    assert seen_at_start == [({"one"}, {"two"})]
    assert checked_out(first) == checked_out(second) == 0


async def test_databases_commit_in_the_order_the_request_first_used_them(
    dbs: list[Database],
) -> None:
    first, second, third = dbs
    commits: list[str] = []
    for db, name in ((first, "first"), (second, "second"), (third, "third")):
        record_events(db, name, commits, "commit")

    # Passed to the middleware as first, second, third; used as third, first, second.
    app = app_doing(
        lambda: add_key(third, "c"),
        lambda: add_key(first, "a"),
        lambda: add_key(second, "b"),
        lambda: add_key(third, "c2"),
    )
    recorder = await call_http(SQLAlchemyMiddleware(app, first, second, third))

    assert recorder.status == 200
    assert commits == ["third:commit", "first:commit", "second:commit"]


async def test_when_the_second_commit_fails_the_client_gets_500_and_the_log_names_each_outcome(
    dbs: list[Database], caplog: pytest.LogCaptureFixture
) -> None:
    first, second, third = dbs
    app = app_doing(
        lambda: add_key(first, "kept"),
        lambda: orphan_child(second),  # its COMMIT fails: deferred foreign key
        lambda: add_key(third, "dropped"),
    )

    recorder = await call_http(SQLAlchemyMiddleware(app, first, second, third))

    assert recorder.status == 500
    assert recorder.types() == ["http.response.start", "http.response.body"]
    assert recorder.body == b"Internal Server Error"
    # The first database had committed before the second failed: it stays committed.
    assert await keys(first) == {"kept"}
    assert await children(second) == 0
    assert await keys(third) == set()
    assert [checked_out(db) for db in dbs] == [0, 0, 0]
    expected = (
        f"{second!r} failed to commit after {first!r} had committed: the request's writes "
        f"are only partly saved. Committed: {first!r}. Not committed: {second!r}, "
        f"{third!r} (rolled back: {third!r})."
    )
    assert expected in asgi_sqla_errors(caplog)


async def test_when_the_first_commit_fails_the_later_databases_are_rolled_back(
    dbs: list[Database], caplog: pytest.LogCaptureFixture
) -> None:
    first, second, _ = dbs
    app = app_doing(lambda: orphan_child(first), lambda: add_key(second, "never"))

    recorder = await call_http(SQLAlchemyMiddleware(app, first, second))

    assert recorder.status == 500
    assert await children(first) == 0
    assert await keys(second) == set()
    expected = (
        f"{first!r} failed to commit; nothing was committed. Committed: none. Not "
        f"committed: {first!r}, {second!r} (rolled back: {second!r})."
    )
    assert expected in asgi_sqla_errors(caplog)


async def test_an_error_status_rolls_back_every_database(dbs: list[Database]) -> None:
    first, second, _ = dbs
    app = app_doing(lambda: add_key(first, "a"), lambda: add_key(second, "b"), status=409)

    recorder = await call_http(SQLAlchemyMiddleware(app, first, second))

    assert recorder.status == 409
    assert await keys(first) == await keys(second) == set()


# -- two-phase commit ------------------------------------------------------------------


async def test_two_phase_commit_prepares_both_databases_then_commits_them(
    dbs: list[Database], server_admin: psycopg.Connection[TupleRow]
) -> None:
    first, second, _ = dbs
    steps: list[str] = []
    for db, name in ((first, "first"), (second, "second")):
        record_events(db, name, steps, "prepare_twophase", "commit_twophase")

    app = app_doing(lambda: add_key(first, "one"), lambda: add_key(second, "two"))
    recorder = await call_http(SQLAlchemyMiddleware(app, first, second, two_phase=True))

    assert recorder.status == 200
    assert steps == [
        "first:prepare_twophase",
        "second:prepare_twophase",
        "first:commit_prepared",
        "second:commit_prepared",
    ]
    assert await keys(first) == {"one"}
    assert await keys(second) == {"two"}
    assert prepared_transactions(server_admin, first, second) == []
    assert checked_out(first) == checked_out(second) == 0


async def test_two_phase_commit_commits_nothing_when_one_database_fails_to_prepare(
    dbs: list[Database],
    server_admin: psycopg.Connection[TupleRow],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second, _ = dbs
    app = app_doing(lambda: add_key(first, "would-be-partial"), lambda: orphan_child(second))

    recorder = await call_http(SQLAlchemyMiddleware(app, first, second, two_phase=True))

    assert recorder.status == 500
    # Unlike a plain commit (test above), the first database's write is rolled back too.
    assert await keys(first) == set()
    assert await children(second) == 0
    assert prepared_transactions(server_admin, first, second) == []
    assert checked_out(first) == checked_out(second) == 0
    errors = asgi_sqla_errors(caplog)
    assert (
        f"Two-phase commit: {second!r} failed to prepare, so nothing is committed: "
        f"{first!r}, {second!r} are rolled back."
    ) in errors
    assert any(
        message.startswith(f"{second!r} failed to commit; nothing was committed.")
        for message in errors
    )


async def test_two_phase_commit_prepares_nothing_when_only_one_database_wrote(
    dbs: list[Database],
) -> None:
    first, second, _ = dbs
    steps: list[str] = []
    for db, name in ((first, "first"), (second, "second")):
        record_events(db, name, steps, "prepare_twophase", "commit_twophase")

    async def read_first() -> None:
        await first.session.execute(text("SELECT count(*) FROM items"))

    app = app_doing(read_first, lambda: add_key(second, "only-writer"))
    recorder = await call_http(SQLAlchemyMiddleware(app, first, second, two_phase=True))

    assert recorder.status == 200
    assert steps == ["first:commit_one_phase", "second:commit_one_phase"]
    assert await keys(second) == {"only-writer"}


async def test_with_two_phase_on_a_request_using_one_database_commits_in_one_phase(
    dbs: list[Database],
) -> None:
    first, second, _ = dbs
    steps: list[str] = []
    record_events(first, "first", steps, "prepare_twophase", "commit_twophase")

    app = app_doing(lambda: add_key(first, "alone"))
    recorder = await call_http(SQLAlchemyMiddleware(app, first, second, two_phase=True))

    assert recorder.status == 200
    assert steps == ["first:commit_one_phase"]
    assert await keys(first) == {"alone"}


async def test_with_two_phase_an_explicit_commit_is_one_phase_and_the_end_still_prepares(
    dbs: list[Database],
) -> None:
    first, second, _ = dbs
    steps: list[str] = []
    for db, name in ((first, "first"), (second, "second")):
        record_events(db, name, steps, "prepare_twophase", "commit_twophase")

    app = app_doing(
        lambda: add_key(first, "early"),
        first.commit,  # one database, committed on its own: no PREPARE
        lambda: add_key(first, "late"),
        lambda: add_key(second, "late"),
    )
    recorder = await call_http(SQLAlchemyMiddleware(app, first, second, two_phase=True))

    assert recorder.status == 200
    assert steps == [
        "first:commit_one_phase",
        "first:prepare_twophase",
        "second:prepare_twophase",
        "first:commit_prepared",
        "second:commit_prepared",
    ]
    assert await keys(first) == {"early", "late"}
    assert await keys(second) == {"late"}


async def test_two_phase_commit_finishes_a_commit_prepared_whose_connection_dropped(
    dbs: list[Database],
    server_admin: psycopg.Connection[TupleRow],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second, _ = dbs
    backend: list[int] = []

    async def write_second() -> None:
        await add_key(second, "two")
        backend.append(int(await second.session.scalar(text("SELECT pg_backend_pid()"))))

    def kill_before_commit_prepared(conn: Any, xid: Any, is_prepared: bool) -> None:
        # The second database is prepared; its connection dies before COMMIT PREPARED.
        server_admin.execute("SELECT pg_terminate_backend(%s, 5000)", (backend[0],))

    event.listen(second.engine.sync_engine, "commit_twophase", kill_before_commit_prepared)
    app = app_doing(lambda: add_key(first, "one"), write_second)
    recorder = await call_http(SQLAlchemyMiddleware(app, first, second, two_phase=True))

    # The transaction was prepared, so it is committed on a new connection: all of the
    # request's writes are saved, and the client is told so.
    assert recorder.status == 200
    assert await keys(first) == {"one"}
    assert await keys(second) == {"two"}
    assert prepared_transactions(server_admin, first, second) == []
    assert checked_out(first) == checked_out(second) == 0
    assert any(
        r.levelno == logging.WARNING
        and f"{second!r}'s COMMIT PREPARED" in r.getMessage()
        and "the transaction is committed" in r.getMessage()
        for r in caplog.records
    )


async def test_two_phase_commit_reports_a_prepared_transaction_someone_rolled_back(
    dbs: list[Database],
    database_urls: list[URL],
    server_admin: psycopg.Connection[TupleRow],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second, _ = dbs
    backend: list[int] = []
    second_admin = _postgres.connect(database_urls[1])

    async def write_second() -> None:
        await add_key(second, "two")
        backend.append(int(await second.session.scalar(text("SELECT pg_backend_pid()"))))

    def roll_back_behind_its_back(conn: Any, xid: Any, is_prepared: bool) -> None:
        server_admin.execute("SELECT pg_terminate_backend(%s, 5000)", (backend[0],))
        second_admin.execute(f"ROLLBACK PREPARED '{xid}'")

    event.listen(second.engine.sync_engine, "commit_twophase", roll_back_behind_its_back)
    app = app_doing(lambda: add_key(first, "one"), write_second)
    try:
        recorder = await call_http(SQLAlchemyMiddleware(app, first, second, two_phase=True))
    finally:
        second_admin.close()

    assert recorder.status == 500
    assert await keys(first) == {"one"}
    assert await keys(second) == set()
    errors = asgi_sqla_errors(caplog)
    assert any("was rolled back by someone else" in message for message in errors)
    assert any(
        message.startswith(f"{second!r} failed to commit after {first!r} had committed")
        for message in errors
    )


async def test_two_phase_commit_is_refused_for_a_database_that_is_not_postgresql(
    dbs: list[Database], tmp_path: Any
) -> None:
    sqlite = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")

    with pytest.raises(ConfigurationError, match="two_phase=True needs PostgreSQL"):
        SQLAlchemyMiddleware(app_doing(), dbs[0], sqlite, two_phase=True)
