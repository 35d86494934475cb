"""Small tools shared by the tests: a table, pool figures and a raw ASGI driver."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, cast

import anyio
import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    event,
    func,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from asgi_sqla import Database, SyncDatabase
from asgi_sqla.types import ASGIApp, Message, Receive, Scope, Send

metadata = MetaData()

#: One row per write; ``key`` is unique so tests can ask "did this request commit?".
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(64), nullable=False, unique=True),
)


async def create_tables(db: Database) -> None:
    """Create the test tables on ``db`` (outside any request)."""
    async with db.engine.begin() as connection:
        await connection.run_sync(metadata.create_all)


async def keys(db: Database) -> set[str]:
    """Every ``items.key`` that is committed, read on a fresh connection."""
    async with db.engine.connect() as connection:
        result = await connection.execute(select(items.c.key))
        return set(result.scalars())


async def count_items(db: Database) -> int:
    async with db.engine.connect() as connection:
        return int((await connection.scalar(select(func.count()).select_from(items))) or 0)


def release(distribution: str) -> tuple[int, int]:
    """The installed (major, minor) of a distribution: for tests whose expectation moved
    with a dependency's release."""
    major, minor = importlib.metadata.version(distribution).split(".")[:2]
    return int(major), int(minor)


def started_engine(db: Database | SyncDatabase) -> AsyncEngine | Engine | None:
    """``db``'s engine if it has one now (started, not yet disposed), else ``None``.

    Unlike ``db.engine``, never creates one.  No public API tells this yet, so this is
    the one place the tests read the private ``Database._engine``.
    """
    return db._engine


def checked_out(db: Database) -> int:
    """Connections of ``db``'s pool currently checked out.

    The tests' databases (SQLite files, PostgreSQL) have a ``QueuePool``, which counts
    them; ``pool_status()`` would say 0 for a pool that does not.
    """
    assert isinstance(db.engine.sync_engine.pool, QueuePool), db.engine.sync_engine.pool
    return db.pool_status().checked_out


def http_scope(path: str = "/", method: str = "GET", **extra: Any) -> Scope:
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 12345),
        "server": ("127.0.0.1", 80),
        "extensions": {},
        "state": {},
    }
    scope.update(extra)
    return scope


def websocket_scope(path: str = "/ws", **extra: Any) -> Scope:
    scope = http_scope(path, **extra)
    scope["type"] = "websocket"
    scope.pop("method")
    scope["subprotocols"] = []
    return scope


#: Longest one ``ASGIRecorder`` call may take: a stuck app fails its own test, with a
#: traceback, before pytest-timeout's 60 s.  That timeout's signal only interrupts the
#: event loop: the test's coroutine stays in the one task where anyio's pytest plugin
#: runs every async test and fixture in turn (``TestRunner._run_tests_and_fixtures``),
#: so each later one would wait behind it, and the session would hang.
CALL_DEADLINE = 30


class ASGIRecorder:
    """Drives one ASGI call: feeds ``incoming`` to ``receive`` and records ``send``.

    After ``incoming`` is exhausted ``receive()`` waits, like a server whose client is
    still connected, until ``disconnect()`` is called or the app has sent its whole
    HTTP response; then it returns ``http.disconnect``, as the ASGI spec says a server
    does "if receive is called after a response has been sent" (HTTP, "Disconnect -
    receive event"; uvicorn and hypercorn do so).  Quart 0.23 waits for that message
    before its ASGI call returns.  ``on_send`` runs before each message is recorded,
    e.g. to inspect the pool at the moment the server receives ``http.response.start``.
    """

    def __init__(
        self,
        incoming: Iterable[Message] = (),
        on_send: Callable[[Message], Awaitable[None] | None] | None = None,
    ) -> None:
        self.sent: list[Message] = []
        self._incoming = list(incoming)
        self._disconnect_due = anyio.Event()
        self._on_send = on_send
        self.receive_calls = 0

    async def receive(self) -> Message:
        self.receive_calls += 1
        if self._incoming:
            return self._incoming.pop(0)
        await self._disconnect_due.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self._on_send is not None:
            result = self._on_send(message)
            if result is not None:
                await result
        self.sent.append(message)
        if _ends_http_response(message):
            self._disconnect_due.set()

    def disconnect(self) -> None:
        self._disconnect_due.set()

    def types(self) -> list[str]:
        return [m["type"] for m in self.sent]

    @property
    def status(self) -> int:
        starts = [m for m in self.sent if m["type"].endswith("response.start")]
        assert len(starts) == 1, self.sent
        return int(starts[0]["status"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"].endswith(".body"))

    async def __call__(self, app: ASGIApp, scope: Scope) -> None:
        with anyio.fail_after(CALL_DEADLINE):
            await app(scope, self.receive, self.send)


def _ends_http_response(message: Message) -> bool:
    """Whether ``message`` is the last one of an HTTP response (the spec's and extensions')."""
    if message["type"] == "http.response.body":
        return not message.get("more_body", False)
    return bool(message["type"] == "http.response.pathsend")


async def call_http(
    app: ASGIApp,
    path: str = "/",
    *,
    method: str = "GET",
    body: bytes = b"",
    on_send: Callable[[Message], Awaitable[None] | None] | None = None,
) -> ASGIRecorder:
    """Call ``app`` with one HTTP request and return the recorder with its response."""
    recorder = ASGIRecorder(
        [{"type": "http.request", "body": body, "more_body": False}], on_send=on_send
    )
    await recorder(app, http_scope(path, method=method))
    return recorder


def as_asgi_app(app: object) -> Callable[[Scope, Receive, Send], Coroutine[Any, Any, None]]:
    """A framework's app, typed as the ASGI app it is (an ``ASGIApp`` whose calls are coroutines).

    Quart and Litestar type their scopes and messages as ``TypedDict`` unions, which
    mypy does not accept where ``asgi_sqla.types`` says ``MutableMapping``.
    """
    return cast(Callable[[Scope, Receive, Send], Coroutine[Any, Any, None]], app)


async def plain_response(
    send: Callable[[Message], Awaitable[None]], status: int, body: bytes = b""
) -> None:
    """Send a complete response from a hand-written ASGI app."""
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def add_key(db: Database, key: str) -> None:
    """Insert ``key`` into ``items`` through ``db.session`` (inside a request or scope)."""
    await db.session.execute(items.insert().values(key=key))


class PoolEvents:
    """Counts the ``connect`` and ``checkout`` pool events of ``db``'s engine from now on."""

    def __init__(self, db: Database) -> None:
        from sqlalchemy import event

        self.connects = 0
        self.checkouts = 0
        event.listen(db.engine.sync_engine, "connect", self._on_connect)
        event.listen(db.engine.sync_engine, "checkout", self._on_checkout)

    def _on_connect(self, *args: Any) -> None:
        self.connects += 1

    def _on_checkout(self, *args: Any) -> None:
        self.checkouts += 1


#: Backends of the admin connection's database other than the admin connection itself.
_OTHER_BACKENDS = (
    "SELECT pid, state, query FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
    "AND backend_type = 'client backend'"
)


def pg_backends(admin: Any) -> list[tuple[int, str | None, str]]:
    """``(pid, state, query)`` of every other client backend of ``admin``'s database.

    ``admin`` is the ``pg_admin`` fixture (a sync autocommit psycopg connection).
    """
    return [(int(pid), state, query) for pid, state, query in admin.execute(_OTHER_BACKENDS)]


async def settled_backends(admin: Any, seconds: float = 3.0) -> list[tuple[int, str | None, str]]:
    """Poll until every other backend of the database is ``idle`` (or gone), up to ``seconds``.

    Returns the backends that are still not idle at the deadline (``[]`` when all
    settled): "idle in transaction" is a leaked transaction, "active" a statement
    still running.  Polls every 10 ms, letting the event loop run in between.
    """
    deadline = anyio.current_time() + seconds
    while True:
        busy = [row for row in pg_backends(admin) if row[1] != "idle"]
        if not busy or anyio.current_time() > deadline:
            return busy
        await anyio.sleep(0.01)  # polling interval, bounded by the deadline


async def wait_for_active_query(admin: Any, like: str, seconds: float = 5.0) -> int:
    """Poll until another backend is ``active`` running a query matching ``like`` (SQL LIKE).

    Returns its pid; fails the test at the deadline.  Lets the event loop run between polls.
    """
    deadline = anyio.current_time() + seconds
    while True:
        for pid, state, query in pg_backends(admin):
            if state == "active" and _sql_like(query, like):
                return pid
        if anyio.current_time() > deadline:
            raise AssertionError(f"no backend ran a query like {like!r}: {pg_backends(admin)}")
        await anyio.sleep(0.005)  # polling interval, bounded by the deadline


def _sql_like(text: str, pattern: str) -> bool:
    import re

    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, re.IGNORECASE | re.DOTALL) is not None


async def idle_in_transaction(
    admin: Any, seconds: float = 3.0
) -> list[tuple[int, str | None, str]]:
    """Poll until no other backend of the database is "idle in transaction", up to ``seconds``.

    Returns those still idle in a transaction (aborted or not) at the deadline, ``[]``
    when none: an open transaction nobody will finish.  Unlike :func:`settled_backends`
    this tolerates backends still running a statement.
    """
    deadline = anyio.current_time() + seconds
    while True:
        idle = [row for row in pg_backends(admin) if (row[1] or "").startswith("idle in trans")]
        if not idle or anyio.current_time() > deadline:
            return idle
        await anyio.sleep(0.01)  # polling interval, bounded by the deadline


# --- Cancelling a request ----------------------------------------------------------------

#: What :func:`cancel_request` hands its trigger: a call that cancels the request.
Cancel = Callable[[], object]

#: The two ways a request gets cancelled (see :func:`cancel_request`).
CANCEL_STYLES = ("cancel-scope", "task-cancel")


async def cancel_request(
    style: str,
    request: Callable[[], Awaitable[object]],
    trigger: Callable[[Cancel], Awaitable[None]],
) -> float:
    """Run ``request()`` in a task of its own; ``trigger(cancel)`` decides when to cancel it.

    ``style``: "task-cancel" (``Task.cancel()``, as a server or ``asyncio.timeout``
    does) or "cancel-scope" (an anyio cancel scope, as ``anyio.fail_after`` or a task
    group does, which delivers the cancellation again at every await).  Fails if the
    request finished instead of being cancelled.  Returns ``time.monotonic()`` as the
    request's task unwound, after the middleware's cleanup returned.
    """
    assert style in CANCEL_STYLES, style
    finished: list[bool] = []
    ended: list[float] = []

    async def run() -> None:
        try:
            await request()
            finished.append(True)
        finally:
            ended.append(time.monotonic())

    with anyio.fail_after(15):
        if style == "cancel-scope":
            scope = anyio.CancelScope()

            async def in_scope() -> None:
                with scope:
                    await run()

            async with anyio.create_task_group() as group:
                group.start_soon(in_scope)
                await trigger(scope.cancel)
            assert scope.cancelled_caught
        else:
            task = asyncio.ensure_future(run())
            await trigger(task.cancel)
            with pytest.raises(asyncio.CancelledError):
                await task
    assert finished == []
    [end] = ended
    return end


def when_running(admin: Any, like: str) -> Callable[[Cancel], Awaitable[None]]:
    """A trigger that cancels once the server is running a statement matching ``like``."""

    async def trigger(cancel: Cancel) -> None:
        await wait_for_active_query(admin, like)
        cancel()

    return trigger


# --- A server process's database and log, seen from the test process ------------------
#
# For the integration tests that run an example app in a real server (tests/_servers.py)
# against ``module_database_url``.


def query(url: str, statement: str) -> list[tuple[Any, ...]]:
    """Rows of ``statement``, run on a new synchronous connection to ``url``'s database.

    ``url`` is an async SQLAlchemy URL of SQLite or PostgreSQL (e.g.
    ``module_database_url``); only committed rows are visible.  No parameters: write
    literals into the statement.
    """
    import contextlib
    import sqlite3

    from sqlalchemy import make_url

    import _postgres

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database, url
        with contextlib.closing(sqlite3.connect(parsed.database)) as connection:
            return list(connection.execute(statement))
    with _postgres.connect(parsed) as connection:
        return list(connection.execute(statement))


def server_backends(url: str) -> list[tuple[int, str | None, str]]:
    """``(pid, state, query)`` of every client backend connected to ``url``'s PostgreSQL database.

    The connection this opens to ask is left out: what remains belongs to the server
    under test.  ``"idle in transaction"`` is a transaction nobody will finish.
    """
    from sqlalchemy import make_url

    import _postgres

    with _postgres.connect(make_url(url)) as admin:
        return pg_backends(admin)


def eventually(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Poll ``check`` until it is true or ``seconds`` have passed; return its last result.

    For state another process changes after it answered (a background task that runs
    after the response was sent), where no event can be awaited.
    """
    import time

    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # polling another process, bounded by the deadline
    return True


_SITECUSTOMIZE = '''\
"""Written by tests/_helpers.py: log asgi_sqla and sqlalchemy.pool to stderr."""
import logging
import sys

_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
for _name in ("asgi_sqla", "sqlalchemy.pool"):
    _logger = logging.getLogger(_name)
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)  # sqlalchemy.pool says "Pool disposed" at INFO
    _logger.propagate = False
'''


def server_logging_env(directory: Any) -> dict[str, str]:
    """Environment for ``_servers.serve`` making the server log ``LEVEL logger: message`` lines.

    Writes a ``sitecustomize.py`` into ``directory`` (a ``pathlib.Path``) and puts it
    first on ``PYTHONPATH``, so the app under test stays as it is while its server's
    log shows the ``asgi_sqla`` errors and ``sqlalchemy.pool``'s "Pool disposed" line
    (the engine was disposed, not merely dropped by the exiting process).
    """
    import os

    from _servers import ROOT

    (directory / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return {"PYTHONPATH": os.pathsep.join([str(directory), str(ROOT)])}


#: What each server logs when the ASGI app raises (the message before the traceback).
SERVER_APP_ERRORS = {
    "uvicorn": "Exception in ASGI application",
    "hypercorn": "Error in ASGI Framework",
    "granian": "Application callable raised an exception",
}


def server_reported_an_app_error(log: str) -> bool:
    """True if ``log`` holds any server's "the app raised" message (see SERVER_APP_ERRORS).

    Also true for uvicorn's complaint about an app that returned without completing
    its response: an invalid ASGI message sequence.
    """
    markers = (*SERVER_APP_ERRORS.values(), "ASGI callable returned without")
    return any(marker in log for marker in markers)


# -- a write that fails at COMMIT --------------------------------------------------------


def _enable_sqlite_foreign_keys(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def children_ddl(dialect: str) -> str:
    """The ``children`` table, whose foreign key is checked at COMMIT where it can be.

    MySQL and MariaDB have no deferrable constraints (their parser refuses
    ``DEFERRABLE``): there the key is checked at each statement, so ``orphan_child``
    fails at its INSERT, not at COMMIT; tests/test_mariadb.py makes its COMMITs fail
    otherwise.
    """
    deferred = "" if dialect in ("mysql", "mariadb") else " DEFERRABLE INITIALLY DEFERRED"
    return (
        "CREATE TABLE children (id INTEGER PRIMARY KEY, parent_id INTEGER NOT NULL "
        f"REFERENCES parents (id){deferred})"
    )


def open_sync_database(url: str, **options: Any) -> SyncDatabase:
    """A ``SyncDatabase`` with the tables of :func:`open_database`."""
    database = SyncDatabase(url, **options)
    if database.engine.dialect.name == "sqlite":
        event.listen(database.engine, "connect", _enable_sqlite_foreign_keys)
    with database.engine.begin() as connection:
        metadata.create_all(connection)
        connection.execute(text("CREATE TABLE parents (id INTEGER PRIMARY KEY)"))
        connection.execute(text(children_ddl(database.engine.dialect.name)))
    return database


def sync_keys(db: SyncDatabase) -> set[str]:
    """Every ``items.key`` committed in ``db``, read on a fresh connection."""
    with db.engine.connect() as connection:
        return set(connection.execute(select(items.c.key)).scalars())


def sync_checked_out(db: SyncDatabase) -> int:
    """Connections of ``db``'s pool checked out now (a ``QueuePool``: SQLite files, PostgreSQL)."""
    assert isinstance(db.engine.pool, QueuePool), db.engine.pool
    return db.pool_status().checked_out


#: Seconds a COMMIT of an ``items`` row whose key starts with "slow" takes, on PostgreSQL.
SLOW_COMMIT_SECONDS = 0.5

#: The deferred trigger that makes such a COMMIT slow: a COMMIT a test can see running
#: (``pg_stat_activity``), and kill, cancel or let a deadline expire during.
SLOW_COMMIT_DDL = [
    f"""
    CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_sleep({SLOW_COMMIT_SECONDS});
        RETURN NULL;
    END $$
    """,
    """
    CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON items
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.key LIKE 'slow%') EXECUTE FUNCTION slow_commit()
    """,
]

#: The pool of a slow-commit database, unless a test's options say otherwise: one
#: connection and no overflow, so that a leaked connection blocks the next request.
_SLOW_COMMIT_POOL = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 5}


async def open_slow_commit_database(url: str, **options: Any) -> Database:
    """A PostgreSQL ``Database`` with ``items`` and :data:`SLOW_COMMIT_DDL`, a pool of one
    connection (no overflow, unless ``options`` say otherwise)."""
    database = Database(url, **{**_SLOW_COMMIT_POOL, **options})
    await create_tables(database)
    async with database.engine.begin() as connection:
        for statement in SLOW_COMMIT_DDL:
            await connection.execute(text(statement))
    return database


def open_slow_commit_sync_database(url: str, **options: Any) -> SyncDatabase:
    """:func:`open_sync_database` on PostgreSQL, with a pool of one connection (no
    overflow, unless ``options`` say otherwise) and a COMMIT that takes
    ``SLOW_COMMIT_SECONDS`` when it commits a key starting with "slow" (a deferred
    trigger): a COMMIT the test can see running, and kill or cancel.
    """
    database = open_sync_database(url, **{**_SLOW_COMMIT_POOL, **options})
    with database.engine.begin() as connection:
        for statement in SLOW_COMMIT_DDL:
            connection.execute(text(statement))
    return database


async def open_database(url: str, **options: Any) -> Database:
    """A ``Database`` with the ``items`` table and a deferred foreign key to violate."""
    database = Database(url, **options)
    if database.engine.dialect.name == "sqlite":
        event.listen(database.engine.sync_engine, "connect", _enable_sqlite_foreign_keys)
    await create_tables(database)
    async with database.engine.begin() as connection:
        await connection.execute(text("CREATE TABLE parents (id INTEGER PRIMARY KEY)"))
        await connection.execute(text(children_ddl(database.engine.dialect.name)))
    return database


async def orphan_child(db: Database) -> None:
    """A write whose statement succeeds but whose COMMIT fails (a deferred foreign key)."""
    await db.session.execute(text("INSERT INTO children (id, parent_id) VALUES (1, 999)"))


# -- a PostgreSQL server of one's own: restartable, with a password role ------------------
#
# For tests that stop, restart or reconfigure the server (tests/test_soak.py,
# tests/test_faults.py): the session's shared server must not be disturbed.


class DedicatedPostgres:
    """A throwaway cluster (``_postgres.TemporaryCluster``) that a test may stop and restart.

    ``with DedicatedPostgres() as pg:`` starts it; it is stopped and deleted at the end
    of the block.  Raises ``_postgres.PostgresUnavailable`` when no server binaries are
    found.  ``pg.admin`` is the superuser URL (trust authentication, driver-less);
    :meth:`add_password_role` makes a login role whose connections must give a
    password, as on a production server.
    """

    def __init__(self) -> None:
        import _postgres

        bindir = _postgres.find_bindir()
        if bindir is None:
            raise _postgres.PostgresUnavailable(
                "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found"
            )
        self.cluster = _postgres.TemporaryCluster(bindir)
        self.admin: Any = None

    def __enter__(self) -> DedicatedPostgres:
        try:
            self.admin = self.cluster.start()
        except BaseException:
            self.cluster.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cluster.stop()

    def _pg_ctl(self, *args: str) -> None:
        result = self.cluster._run("pg_ctl", *args, "--pgdata", str(self.cluster.data_directory))
        if result.returncode != 0:
            log = self.cluster.log_file.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"pg_ctl {args[0]} failed:\n{result.stdout}{result.stderr}\n{log}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl stop -m MODE``); its data and port are kept."""
        self._pg_ctl("stop", "--mode", mode, "--wait")

    def start(self) -> None:
        """Start the stopped server again on the same port; return once it accepts connections."""
        import time

        import _postgres

        port = f"-p {self.cluster.port}"
        self._pg_ctl("start", "--wait", "--log", str(self.cluster.log_file), "-o", port)
        _postgres._wait_until_accepting(self.admin, deadline=time.monotonic() + 30)

    @property
    def running(self) -> bool:
        """Whether the server is up (it has a ``postmaster.pid``)."""
        return bool((self.cluster.data_directory / "postmaster.pid").exists())

    def restart(self, mode: str = "fast") -> None:
        """Stop the server and start it again: every connection to it is lost."""
        self.stop(mode)
        self.start()

    def add_password_role(self, role: str, password: str) -> Any:
        """Create ``role`` (LOGIN, that password) and a database of the same name it owns.

        A ``pg_hba.conf`` line is put first so that this role's TCP connections must
        authenticate with scram-sha-256 (other roles keep trust); returns once a wrong
        password is refused.  Returns the driver-less URL of the role's database,
        password included.
        """
        import time

        import psycopg
        from psycopg import sql

        import _postgres

        name = sql.Identifier(role)
        with _postgres.connect(self.admin) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(name, sql.Literal(password))
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(name, name)
            )
            hba = self.cluster.data_directory / "pg_hba.conf"
            hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
            conn.execute("SELECT pg_reload_conf()")
        url = self.admin.set(username=role, password=password, database=role)
        deadline = time.monotonic() + 10
        while True:  # the reload is asynchronous: wait until it took effect
            try:
                _postgres.connect(url.set(password="not-" + password)).close()
            except psycopg.OperationalError as exc:
                if "password authentication failed" in str(exc):
                    return url
                raise
            if time.monotonic() > deadline:
                raise AssertionError("pg_hba.conf reload did not take effect")
            time.sleep(0.02)  # polling the server, bounded by the deadline

    def backends(self, database: str) -> list[tuple[int, str | None, str]]:
        """``(pid, state, query)`` of every client backend connected to ``database``."""
        import _postgres

        with _postgres.connect(self.admin) as conn:
            rows = conn.execute(
                "SELECT pid, state, query FROM pg_stat_activity "
                "WHERE datname = %s AND backend_type = 'client backend'",
                (database,),
            )
            return [(int(pid), state, query) for pid, state, query in rows]


def postgres_unavailable(reason: str) -> Any:
    """Skip the test for want of PostgreSQL, or fail it when ``CI`` is ``true`` or ``1``.

    Like ``conftest.py`` does for the shared server, for fixtures that start their own
    (:class:`DedicatedPostgres`).
    """
    import os

    import pytest

    if os.environ.get("CI", "").strip().lower() in {"true", "1"}:
        pytest.fail(f"{reason}; CI is set, so PostgreSQL tests must not be skipped", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable: {reason}")


#: An app's flavour -> the SQLAlchemy driver of its PostgreSQL URL.  "sync-" ones serve
#: a SyncDatabase.
PG_DRIVERS = {
    "asyncpg": "postgresql+asyncpg",
    "psycopg": "postgresql+psycopg",
    "sync-psycopg": "postgresql+psycopg",
    "sync-psycopg2": "postgresql+psycopg2",
}


class TcpRelay:
    """A TCP relay on a free 127.0.0.1 port to ``host:port``, for faults on the wire.

    Each connection a client opens gets one to the target, and the pair is handed to
    :meth:`serve`, which a subclass writes (two threads, one per direction, usually).
    :meth:`close` closes the listener and every socket.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def serve(self, client: socket.socket, server: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        for sock in (self._listener, *self._sockets):
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            self.serve(client, server)
