"""The contract on MariaDB: aiomysql and asyncmy for ``Database``, PyMySQL for ``SyncDatabase``.

The server is real (``tests/_mariadb.py``, started once for the session when a test
here asks for it).  The tests of other modules that hold on any database are collected
here again (imported below: pytest collects every ``test_*`` function of a module's
namespace, and they take this module's ``database_url``, ``sync_database_url`` and
``serializable`` fixtures); the rest is what MariaDB does its own way:

* A COMMIT that fails for real.  MariaDB has no deferrable constraints, so every
  statement's error comes at the statement.  What does fail at COMMIT: a server made
  read-only (``SET GLOBAL read_only = 1``) between the last statement and the COMMIT:
  ``ha_commit_trans()`` (sql/handler.cc) refuses to commit a transaction that wrote,
  for a user without the ``READ ONLY ADMIN`` privilege, with error 1290, and rolls it
  back.  And a connection killed there (``KILL CONNECTION`` from ``before_commit``):
  the COMMIT meets a closed socket (error 2013), which is a lost connection, a 503.
* A deadlock (error 1213) between two requests, detected by InnoDB at the INSERT.
* Read-only routes: ``SET TRANSACTION READ ONLY``, the write refused with error 1792.
* Connections refused (error 2003): a 503; a refused password (1045): not a 503.
* ``two_phase=True``: XA transactions, every database the request used prepared.
* A request cancelled mid-statement: the drivers close the socket without stopping the
  statement, which the server runs to its end (or to ``max_statement_time``).

The Python blocks of ``docs/guides/mysql.md`` are run here too, on MariaDB (at the end).
"""

from __future__ import annotations

import logging
import re
import sys
import types
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import URL, event, make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from asgi_sqla import (
    CommitFailedError,
    Database,
    SQLAlchemyMiddleware,
    SyncDatabase,
)
from asgi_sqla.types import Receive, Scope, Send

import _mariadb
from _helpers import (
    CANCEL_STYLES,
    ASGIRecorder,
    Cancel,
    add_key,
    call_http,
    cancel_request,
    checked_out,
    create_tables,
    eventually,
    http_scope,
    items,
    keys,
    open_database,
    open_sync_database,
    plain_response,
    sync_checked_out,
    sync_keys,
)
from test_connection_release import (  # noqa: F401 -- collected here, on MariaDB
    test_a_session_opened_after_start_commits_even_for_an_error_status,
    test_a_streaming_body_holds_no_connection_between_chunks,
    test_at_response_start_the_connection_is_back_and_the_outcome_is_visible,
)
from test_exceptions import (  # noqa: F401 -- collected here, on MariaDB
    test_a_starlette_endpoint_error_answered_with_500_is_rolled_back,
    test_an_exception_before_the_start_rolls_back_and_propagates_unchanged,
)
from test_multi_database import app_doing, record_events
from test_routes import (  # noqa: F401 -- collected here, on MariaDB
    test_two_conflicting_requests_on_a_retry_route_both_succeed_with_both_writes,
    test_without_retry_one_of_two_conflicting_requests_gets_500,
)
from test_status_line import (  # noqa: F401 -- collected here, on MariaDB
    test_a_custom_commit_on_decides_from_the_status,
    test_a_response_below_400_commits_the_request,
    test_a_response_of_400_or_more_rolls_the_request_back,
    test_commit_on_none_keeps_what_the_app_committed_and_drops_the_rest,
    test_starlette_background_task_runs_after_a_successful_commit,
)
from test_sync import (  # noqa: F401 -- collected here, on MariaDB
    test_a_response_below_400_commits_before_the_status_line,
    test_a_response_of_400_or_more_rolls_back,
    test_an_app_that_raises_rolls_back,
)

pytestmark = [pytest.mark.anyio, pytest.mark.mariadb]

#: ER_OPTION_PREVENTS_STATEMENT: "The MariaDB server is running with the --read-only option".
READ_ONLY_SERVER = 1290
#: ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION.
READ_ONLY_TRANSACTION = 1792
#: CR_SERVER_LOST: "Lost connection to server during query".
SERVER_LOST = 2013


@pytest.fixture
def database_url(mariadb_url: str) -> str:
    """This module's ``database_url``: MariaDB only (``mariadb-aiomysql``, ``mariadb-asyncmy``)."""
    return mariadb_url


@pytest.fixture
def sync_database_url(sync_mariadb_url: str) -> str:
    """This module's ``sync_database_url``: MariaDB through PyMySQL (id ``mariadb-pymysql``)."""
    return sync_mariadb_url


@pytest.fixture
async def serializable(mariadb_url: str) -> AsyncIterator[Database]:
    """For tests/test_routes.py's conflicts: under SERIALIZABLE, InnoDB takes a shared lock
    on what a plain SELECT reads, so two requests that count the rows and then insert
    one deadlock (error 1213) at the second INSERT."""
    database = Database(mariadb_url, isolation_level="SERIALIZABLE")
    await create_tables(database)
    try:
        yield database
    finally:
        await database.dispose()


def error_code(error: BaseException | None) -> int | None:
    """The MySQL error number of a driver error wrapped by SQLAlchemy."""
    orig = getattr(error, "orig", None)
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def asgi_sqla_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "asgi_sqla" and r.levelno >= logging.ERROR]


# -- a COMMIT that fails ------------------------------------------------------------------


@pytest.fixture
def app_user(mariadb_databases: _mariadb.DatabaseFactory, mariadb_database: URL) -> Iterator[URL]:
    """The test database's URL for a new user with every right on it and none on the server.

    Unlike root, such a user is bound by the server's ``read_only``.
    """
    name, password = f"u_{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    mariadb_databases.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (name, password))
    try:
        mariadb_databases.execute(
            f"GRANT ALL ON `{mariadb_database.database}`.* TO %s@'%%'", (name,)
        )
        yield mariadb_database.set(username=name, password=password)
    finally:
        mariadb_databases.execute("DROP USER IF EXISTS %s@'%%'", (name,))


class ReadOnlyServer:
    """Makes the whole server read-only on demand; writable again when the test ends."""

    def __init__(self, admin: _mariadb.DatabaseFactory) -> None:
        self.admin = admin

    def now(self) -> None:
        # Waits only for statements running and COMMITs under way (it takes the global
        # read lock for a moment), not for open transactions like the request's.
        self.admin.execute("SET GLOBAL read_only = 1")


@pytest.fixture
def read_only_server(mariadb_databases: _mariadb.DatabaseFactory) -> Iterator[ReadOnlyServer]:
    try:
        yield ReadOnlyServer(mariadb_databases)
    finally:
        mariadb_databases.execute("SET GLOBAL read_only = 0")


@pytest.mark.parametrize("driver", ["mariadb+aiomysql", "mysql+asyncmy"])
async def test_a_commit_the_server_refuses_answers_500_and_keeps_nothing(
    app_user: URL,
    read_only_server: ReadOnlyServer,
    driver: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = await open_database(app_user.set(drivername=driver).render_as_string(hide_password=False))
    try:
        app_errors: list[BaseException] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, "doomed")
            read_only_server.now()  # after the last statement, before the COMMIT
            try:
                await plain_response(send, 200, b"saved")
            except BaseException as error:
                app_errors.append(error)
                raise

        with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
            recorder = await call_http(SQLAlchemyMiddleware(app, db))

        assert recorder.status == 500
        assert recorder.body == b"Internal Server Error"
        [record] = asgi_sqla_errors(caplog)
        assert record.exc_info is not None
        assert error_code(record.exc_info[1]) == READ_ONLY_SERVER
        assert [type(e) for e in app_errors] == [CommitFailedError]
        assert await keys(db) == set()
        assert checked_out(db) == 0
    finally:
        await db.dispose()


async def test_a_sync_commit_the_server_refuses_answers_500_and_keeps_nothing(
    app_user: URL, read_only_server: ReadOnlyServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = app_user.set(drivername="mariadb+pymysql").render_as_string(hide_password=False)
    db = open_sync_database(url)
    try:

        def work() -> None:
            db.session.execute(items.insert().values(key="doomed"))
            read_only_server.now()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await anyio.to_thread.run_sync(work)
            await plain_response(send, 201)

        with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
            recorder = await call_http(SQLAlchemyMiddleware(app, db))

        assert recorder.status == 500
        [record] = asgi_sqla_errors(caplog)
        assert record.exc_info is not None
        assert error_code(record.exc_info[1]) == READ_ONLY_SERVER
        assert sync_keys(db) == set()
        assert sync_checked_out(db) == 0
    finally:
        db.dispose()


def kill_own_connection(admin: _mariadb.DatabaseFactory) -> Any:
    """A ``before_commit`` hook that has the admin kill the session's connection."""

    def hook(session: Session) -> None:
        connection_id = session.execute(text("SELECT CONNECTION_ID()")).scalar_one()
        admin.execute(f"KILL CONNECTION {int(connection_id)}")

    return hook


async def test_a_connection_killed_before_the_commit_answers_503_with_retry_after(
    database_url: str,
    mariadb_databases: _mariadb.DatabaseFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = await open_database(database_url)
    try:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, "lost")
            db.before_commit(kill_own_connection(mariadb_databases))
            await plain_response(send, 200, b"saved")

        with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
            recorder = await call_http(SQLAlchemyMiddleware(app, db))

        assert recorder.status == 503
        [start] = [m for m in recorder.sent if m["type"] == "http.response.start"]
        assert (b"retry-after", b"1") in start["headers"]
        assert b"saved" not in recorder.body
        [record] = asgi_sqla_errors(caplog)
        assert record.exc_info is not None
        assert error_code(record.exc_info[1]) == SERVER_LOST
        assert await keys(db) == set()
        assert checked_out(db) == 0
        # The pool dropped the dead connection: the next request commits.
        recorder = await call_http(SQLAlchemyMiddleware(app_that_adds(db, "next"), db))
        assert recorder.status == 201
        assert await keys(db) == {"next"}
    finally:
        await db.dispose()


async def test_a_sync_connection_killed_before_the_commit_answers_503_with_retry_after(
    sync_db: SyncDatabase, mariadb_databases: _mariadb.DatabaseFactory
) -> None:
    def work() -> None:
        sync_db.session.execute(items.insert().values(key="lost"))
        sync_db.before_commit(kill_own_connection(mariadb_databases))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(work)
        await plain_response(send, 201, b"saved")

    recorder = await call_http(SQLAlchemyMiddleware(app, sync_db))

    assert recorder.status == 503
    [start] = [m for m in recorder.sent if m["type"] == "http.response.start"]
    assert (b"retry-after", b"1") in start["headers"]
    assert sync_keys(sync_db) == set()
    assert sync_checked_out(sync_db) == 0


def connection_gone(admin: _mariadb.DatabaseFactory, connection_id: int) -> bool:
    """Whether the server connection ``connection_id`` has ended."""
    rows = admin.execute(
        "SELECT id FROM information_schema.processlist WHERE id = %s", (connection_id,)
    )
    return rows == []


def app_that_adds(db: Database, key: str) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, key)
        await plain_response(send, 201)

    return app


# -- the database unavailable -------------------------------------------------------------


@pytest.mark.parametrize("driver", ["mariadb+aiomysql", "mysql+asyncmy"])
async def test_a_server_that_refuses_connections_answers_503_at_once(driver: str) -> None:
    url = _mariadb.free_port_url().set(drivername=driver).render_as_string(hide_password=False)
    db = Database(url, pool_timeout=5)
    try:
        began = anyio.current_time()
        recorder = await call_http(SQLAlchemyMiddleware(app_that_adds(db, "refused"), db))

        assert recorder.status == 503
        [start] = [m for m in recorder.sent if m["type"] == "http.response.start"]
        assert (b"retry-after", b"1") in start["headers"]
        assert anyio.current_time() - began < 5
        assert checked_out(db) == 0
    finally:
        await db.dispose()


async def test_a_refused_password_is_not_an_unavailable_database(
    database_url: str, mariadb_server: URL
) -> None:
    """Error 1045 is the server answering: the app's configuration, not a 503 to retry."""
    url = make_url(database_url).set(password="wrong-password")
    db = Database(url.render_as_string(hide_password=False))
    try:
        with pytest.raises(DBAPIError) as raised:
            await call_http(SQLAlchemyMiddleware(app_that_adds(db, "denied"), db))

        assert error_code(raised.value) == 1045
        assert checked_out(db) == 0
    finally:
        await db.dispose()


# -- read-only routes ---------------------------------------------------------------------


async def test_a_read_only_route_reads_and_mariadb_refuses_its_writes(db: Database) -> None:
    refused: list[BaseException] = []
    read: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        read.append(int(await db.session.scalar(text("SELECT COUNT(*) FROM items")) or 0))
        try:
            await add_key(db, "written")
        except DBAPIError as exc:
            refused.append(exc)
        await plain_response(send, 200)

    recorder = await call_http(
        SQLAlchemyMiddleware(app, db, read_only=["/reports/*"]), "/reports/1"
    )

    assert recorder.status == 200
    assert read == [0]
    assert [error_code(e) for e in refused] == [READ_ONLY_TRANSACTION]
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_a_sync_read_only_route_has_its_writes_refused_by_mariadb(
    sync_db: SyncDatabase,
) -> None:
    refused: list[BaseException] = []

    def work() -> None:
        try:
            sync_db.session.execute(items.insert().values(key="written"))
        except DBAPIError as exc:
            refused.append(exc)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(work)
        await plain_response(send, 200)

    await call_http(SQLAlchemyMiddleware(app, sync_db, read_only=["/"]))

    assert [error_code(e) for e in refused] == [READ_ONLY_TRANSACTION]
    assert sync_keys(sync_db) == set()
    assert sync_checked_out(sync_db) == 0


# -- two-phase commit: XA -----------------------------------------------------------------


@pytest.fixture
async def two_dbs(
    database_url: str, mariadb_databases: _mariadb.DatabaseFactory
) -> AsyncIterator[tuple[Database, Database]]:
    """Two databases on the server (``items`` in each), for ``two_phase=True``."""
    second_database = mariadb_databases.create()
    second_url = make_url(database_url).set(database=second_database.database)
    first = await open_database(database_url)
    second = await open_database(second_url.render_as_string(hide_password=False))
    try:
        yield first, second
    finally:
        await first.dispose()
        await second.dispose()
        mariadb_databases.drop(second_database)


def xa_prepared(admin: _mariadb.DatabaseFactory) -> list[tuple[Any, ...]]:
    """The XA transactions left prepared on the server (XA is server-wide)."""
    return admin.execute("XA RECOVER")


async def test_two_phase_commit_prepares_both_databases_with_xa_then_commits_them(
    two_dbs: tuple[Database, Database], mariadb_databases: _mariadb.DatabaseFactory
) -> None:
    first, second = two_dbs
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
    assert xa_prepared(mariadb_databases) == []
    assert checked_out(first) == checked_out(second) == 0


async def test_two_phase_commit_prepares_a_database_that_only_read_on_mariadb(
    two_dbs: tuple[Database, Database],
) -> None:
    """MariaDB cannot say whether a transaction wrote: both are prepared (on PostgreSQL,
    the reader would commit in one phase)."""
    first, second = two_dbs
    steps: list[str] = []
    for db, name in ((first, "first"), (second, "second")):
        record_events(db, name, steps, "prepare_twophase", "commit_twophase")

    async def read_first() -> None:
        await first.session.execute(text("SELECT COUNT(*) FROM items"))

    app = app_doing(read_first, lambda: add_key(second, "only-writer"))
    recorder = await call_http(SQLAlchemyMiddleware(app, first, second, two_phase=True))

    assert recorder.status == 200
    assert steps == [
        "first:prepare_twophase",
        "second:prepare_twophase",
        "first:commit_prepared",
        "second:commit_prepared",
    ]
    assert await keys(second) == {"only-writer"}


async def test_with_two_phase_a_request_using_one_mariadb_database_commits_in_one_phase(
    two_dbs: tuple[Database, Database],
) -> None:
    first, second = two_dbs
    steps: list[str] = []
    record_events(first, "first", steps, "prepare_twophase", "commit_twophase")

    app = app_doing(lambda: add_key(first, "alone"))
    recorder = await call_http(SQLAlchemyMiddleware(app, first, second, two_phase=True))

    assert recorder.status == 200
    assert steps == ["first:commit_one_phase"]
    assert await keys(first) == {"alone"}
    assert checked_out(first) == 0


async def test_two_phase_commit_commits_nothing_when_one_mariadb_database_fails_to_prepare(
    two_dbs: tuple[Database, Database],
    mariadb_databases: _mariadb.DatabaseFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = two_dbs

    async def write_second() -> None:
        await add_key(second, "two")
        # Its connection is killed as it prepares (before_commit runs in the prepare).
        second.before_commit(kill_own_connection(mariadb_databases))

    app = app_doing(lambda: add_key(first, "would-be-partial"), write_second)
    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        recorder = await call_http(SQLAlchemyMiddleware(app, first, second, two_phase=True))

    assert recorder.status == 503  # the lost connection: the database was unavailable
    # The first database had prepared: it is rolled back (XA ROLLBACK) too.
    assert await keys(first) == set()
    assert await keys(second) == set()
    assert xa_prepared(mariadb_databases) == []
    assert checked_out(first) == checked_out(second) == 0
    messages = [r.getMessage() for r in asgi_sqla_errors(caplog)]
    assert (
        f"Two-phase commit: {second!r} failed to prepare, so nothing is committed: "
        f"{first!r}, {second!r} are rolled back."
    ) in messages


async def test_two_phase_commit_finishes_an_xa_commit_whose_connection_dropped(
    two_dbs: tuple[Database, Database],
    mariadb_databases: _mariadb.DatabaseFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = two_dbs
    connection: list[int] = []

    async def write_second() -> None:
        await add_key(second, "two")
        connection.append(int(await second.session.scalar(text("SELECT CONNECTION_ID()")) or 0))

    def kill_before_xa_commit(conn: Any, xid: Any, is_prepared: bool) -> None:
        # The second database is prepared; its connection dies before XA COMMIT.
        mariadb_databases.execute(f"KILL CONNECTION {connection[0]}")

    event.listen(second.engine.sync_engine, "commit_twophase", kill_before_xa_commit)
    app = app_doing(lambda: add_key(first, "one"), write_second)
    with caplog.at_level(logging.WARNING, logger="asgi_sqla"):
        recorder = await call_http(SQLAlchemyMiddleware(app, first, second, two_phase=True))

    # Still prepared after its connection died, so XA RECOVER lists it, and it is
    # committed on a new connection: every write is saved, and the client is told so.
    assert recorder.status == 200
    assert await keys(first) == {"one"}
    assert await keys(second) == {"two"}
    assert xa_prepared(mariadb_databases) == []
    assert checked_out(first) == checked_out(second) == 0
    assert any(
        r.levelno == logging.WARNING
        and f"{second!r}'s XA COMMIT" in r.getMessage()
        and "the transaction is committed" in r.getMessage()
        for r in caplog.records
    )


async def test_two_phase_commit_reports_an_xa_transaction_gone_from_xa_recover_as_unknown(
    two_dbs: tuple[Database, Database],
    mariadb_databases: _mariadb.DatabaseFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = two_dbs
    connection: list[int] = []

    async def write_second() -> None:
        await add_key(second, "two")
        connection.append(int(await second.session.scalar(text("SELECT CONNECTION_ID()")) or 0))

    def roll_back_behind_its_back(conn: Any, xid: Any, is_prepared: bool) -> None:
        mariadb_databases.execute(f"KILL CONNECTION {connection[0]}")
        # The killed connection's thread releases the transaction as it ends: until
        # then no other connection may end it.
        assert eventually(lambda: connection_gone(mariadb_databases, connection[0]), 5)
        mariadb_databases.execute("XA ROLLBACK %s", (xid,))

    event.listen(second.engine.sync_engine, "commit_twophase", roll_back_behind_its_back)
    app = app_doing(lambda: add_key(first, "one"), write_second)
    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        recorder = await call_http(SQLAlchemyMiddleware(app, first, second, two_phase=True))

    # Unlike PostgreSQL's txid_status(), nothing tells a commit from a rollback here: the
    # request is answered as failed, and the log says the outcome is unknown.
    assert recorder.status == 500
    assert await keys(first) == {"one"}
    assert await keys(second) == set()
    assert xa_prepared(mariadb_databases) == []
    assert checked_out(first) == checked_out(second) == 0
    messages = [r.getMessage() for r in asgi_sqla_errors(caplog)]
    assert any("XA RECOVER no longer lists the transaction" in m for m in messages)
    assert any(
        m.startswith(f"{second!r} failed to commit after {first!r} had committed") for m in messages
    )


async def test_two_phase_commit_finishes_an_xa_commit_that_failed_before_it_was_sent(
    two_dbs: tuple[Database, Database],
    mariadb_databases: _mariadb.DatabaseFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The XA COMMIT fails in the client, before it is sent: the transaction is still
    prepared, attached to the request's connection until the package has discarded it
    (MariaDB lets no other connection commit it until then: XAER_NOTA), and then it is
    committed on a new connection."""
    first, second = two_dbs
    failed: list[str] = []

    def fail_before_xa_commit(conn: Any, xid: Any, is_prepared: bool) -> None:
        failed.append(str(xid))
        raise ConnectionResetError("the connection failed before XA COMMIT")

    event.listen(second.engine.sync_engine, "commit_twophase", fail_before_xa_commit, once=True)
    app = app_doing(lambda: add_key(first, "one"), lambda: add_key(second, "two"))
    with caplog.at_level(logging.WARNING, logger="asgi_sqla"):
        recorder = await call_http(SQLAlchemyMiddleware(app, first, second, two_phase=True))

    assert len(failed) == 1
    assert recorder.status == 200
    assert await keys(first) == {"one"}
    assert await keys(second) == {"two"}
    assert xa_prepared(mariadb_databases) == []
    assert checked_out(first) == checked_out(second) == 0
    assert any(f"{second!r}'s XA COMMIT" in r.getMessage() for r in caplog.records)


async def test_with_two_phase_a_read_only_route_reads_both_mariadb_databases(
    two_dbs: tuple[Database, Database],
) -> None:
    first, second = two_dbs
    counts: list[int] = []

    async def count(db: Database) -> None:
        counts.append(int(await db.session.scalar(text("SELECT COUNT(*) FROM items")) or 0))

    app = app_doing(lambda: count(first), lambda: count(second))
    wrapped = SQLAlchemyMiddleware(app, first, second, two_phase=True, read_only=["/"])
    recorder = await call_http(wrapped)

    assert recorder.status == 200
    assert counts == [0, 0]
    assert checked_out(first) == checked_out(second) == 0


# -- docs/guides/mysql.md -----------------------------------------------------------------

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guides" / "mysql.md"


def guide_blocks() -> dict[str, str]:
    """The ``python`` blocks of the guide, by the file their first line names."""
    blocks: dict[str, str] = {}
    for block in re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.DOTALL):
        first_line = block.splitlines()[0]
        assert re.fullmatch(r"# \w+\.py", first_line), first_line
        blocks[first_line[2:-3]] = block
    return blocks


def load_guide_block(name: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Run the guide's block ``name`` as the module ``name`` (until the test ends)."""
    module = types.ModuleType(name)
    # SQLAlchemy resolves ``Mapped[int]`` in the namespace of the class's module.
    monkeypatch.setitem(sys.modules, name, module)
    exec(compile(guide_blocks()[name], f"docs/guides/{name}.py", "exec"), module.__dict__)
    return module


def test_every_python_block_of_the_guide_is_run_below() -> None:
    assert sorted(guide_blocks()) == ["mysql_app", "statement_time"]


async def test_the_guides_app_runs_on_mariadb_as_written(
    database_url: str, mariadb_databases: _mariadb.DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    module = load_guide_block("mysql_app", monkeypatch)

    async with LifespanManager(module.app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            created = await client.post("/notes", json={"text": "hello"})
            counted = await client.get("/reports/count")

    assert (created.status_code, created.json()) == (201, {"id": 1, "text": "hello"})
    assert (counted.status_code, counted.json()) == (200, {"count": 1})
    assert mariadb_databases.execute(
        f"SELECT text FROM `{make_url(database_url).database}`.notes"
    ) == [("hello",)]


# -- cancellation -------------------------------------------------------------------------


class SleepingConnection:
    """A ``cancel_request`` trigger: cancels once the server runs the request's SLEEP.

    Keeps the id of the server connection that ran it, to ask whether it is still there.
    """

    def __init__(self, admin: _mariadb.DatabaseFactory, database: str) -> None:
        self.admin = admin
        self.database = database
        self.connection_id: int | None = None

    async def __call__(self, cancel: Cancel) -> None:
        deadline = anyio.current_time() + 5
        while not (rows := self._sleeping()):
            assert anyio.current_time() < deadline, "the request's SLEEP never ran"
            await anyio.sleep(0.005)  # polling the server, bounded by the deadline
        [(self.connection_id,)] = rows
        cancel()

    def _sleeping(self) -> list[tuple[Any, ...]]:
        return self.admin.execute(
            "SELECT id FROM information_schema.processlist "
            "WHERE db = %s AND info LIKE 'SELECT SLEEP%%'",
            (self.database,),
        )

    def gone(self) -> bool:
        """Whether the server connection has ended (and so has its transaction, rolled back).

        Asked of the process list, which is current; ``information_schema.innodb_trx``
        is a copy refreshed at most every 0.1 s.
        """
        assert self.connection_id is not None
        rows = self.admin.execute(
            "SELECT id FROM information_schema.processlist WHERE id = %s", (self.connection_id,)
        )
        return rows == []


#: Seconds the server's statement runs, and options of the Database, in each variant:
#: the drivers close the socket of a cancelled statement without asking the server to
#: stop it, so it runs to its end (holding its transaction's locks); MariaDB's
#: ``max_statement_time`` (set for each connection with ``init_command``) bounds that.
_CANCELLED_STATEMENTS = {
    "runs-to-its-end": (2, {}),
    "max_statement_time": (30, {"connect_args": {"init_command": "SET max_statement_time = 1"}}),
}


@pytest.mark.parametrize("statement", _CANCELLED_STATEMENTS)
@pytest.mark.parametrize("style", CANCEL_STYLES)
async def test_cancelling_a_request_mid_query_leaks_no_connection_and_no_transaction(
    database_url: str, mariadb_databases: _mariadb.DatabaseFactory, style: str, statement: str
) -> None:
    database = make_url(database_url).database
    assert database
    seconds, options = _CANCELLED_STATEMENTS[statement]
    db = await open_database(database_url, pool_size=1, max_overflow=0, pool_timeout=5, **options)
    try:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, "cancelled")
            await db.session.execute(text(f"SELECT SLEEP({seconds})"))
            await plain_response(send, 201)

        recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
        wrapped = SQLAlchemyMiddleware(app, db)
        sleeping = SleepingConnection(mariadb_databases, database)
        await cancel_request(style, lambda: recorder(wrapped, http_scope()), sleeping)
        cancelled = anyio.current_time()

        assert recorder.sent == []
        assert checked_out(db) == 0
        # The pool of one connection serves the next request at once.
        with anyio.fail_after(2):
            recorder = await call_http(SQLAlchemyMiddleware(app_that_adds(db, "next"), db))
        assert recorder.status == 201
        # The server ends the cancelled request's transaction (rolled back) once its
        # statement has ended: when it ran its course, or after max_statement_time.
        assert not sleeping.gone()  # MariaDB is still running it
        assert eventually(sleeping.gone, 5)
        assert anyio.current_time() - cancelled < (3 if statement == "max_statement_time" else 5)
        assert await keys(db) == {"next"}
        assert checked_out(db) == 0
    finally:
        await db.dispose()


async def test_the_guides_statement_time_is_set_on_every_connection(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    db: Database = load_guide_block("statement_time", monkeypatch).db
    try:
        async with db.scope() as session:
            assert await session.scalar(text("SELECT @@max_statement_time")) == 30
    finally:
        await db.dispose()
