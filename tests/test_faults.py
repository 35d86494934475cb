"""One deterministic test per fault of the soak (tests/test_soak.py) not covered elsewhere.

Covered elsewhere, and not repeated here: a deferred constraint or a serialization
failure at COMMIT and a backend killed before the COMMIT (test_status_line.py), the app
raising before or after its response starts (test_exceptions.py), cancellation at every
await point and a client disconnect seen by the app (test_cancellation.py), and pool
exhaustion (test_pool_exhaustion.py).

Here: a backend killed *during* the COMMIT; a request deadline (a timeout) that expires
during the COMMIT (whether the COMMIT then succeeds or fails), or before it; the
database restarted, with and without ``pool_pre_ping``, and down; clients hanging up
on a real server (uvicorn) mid-body and before the response; and the database
password, which no error path may show.

Restarts need a PostgreSQL cluster of this module's own; on it, the app's role has a
password that the server checks (scram-sha-256).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import sys
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import anyio
import anyio.lowlevel
import httpx
import psycopg
import pytest
from psycopg import sql
from psycopg.rows import TupleRow
from sqlalchemy import URL, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_sqla import Database, SQLAlchemyMiddleware
from asgi_sqla.types import ASGIApp, Message, Receive, Scope, Send

import _postgres
from _helpers import (
    ASGIRecorder,
    DedicatedPostgres,
    add_key,
    call_http,
    checked_out,
    create_tables,
    eventually,
    http_scope,
    keys,
    open_slow_commit_database,
    plain_response,
    postgres_unavailable,
    wait_for_active_query,
)
from _servers import Server, serve

pytestmark = pytest.mark.anyio


@pytest.fixture
async def slow_db(postgresql_url: str) -> AsyncIterator[Database]:
    database = await open_slow_commit_database(postgresql_url)
    try:
        yield database
    finally:
        await database.dispose()


async def assert_next_request_commits(db: Database, key: str) -> None:
    """A plain request on ``db`` answers 201 and its row is committed."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, key)
        await plain_response(send, 201)

    with anyio.fail_after(10):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))
    assert recorder.status == 201
    assert key in await keys(db)
    assert checked_out(db) == 0


def starts(recorder: ASGIRecorder) -> list[int]:
    """The status of every ``http.response.start`` the server got."""
    return [m["status"] for m in recorder.sent if m["type"] == "http.response.start"]


def retry_after(recorder: ASGIRecorder) -> list[bytes]:
    """The ``Retry-After`` values of the responses the server got."""
    return [
        value
        for m in recorder.sent
        if m["type"] == "http.response.start"
        for name, value in m["headers"]
        if name.lower() == b"retry-after"
    ]


# -- a backend killed during the COMMIT ----------------------------------------------------


async def test_a_backend_killed_mid_commit_answers_503_with_retry_after_and_commits_nothing(
    slow_db: Database,
    pg_admin: psycopg.Connection[TupleRow],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(slow_db, "slow-killed")
        await plain_response(send, 201, b"created")

    results: list[ASGIRecorder] = []

    async def request() -> None:
        results.append(await call_http(SQLAlchemyMiddleware(app, slow_db)))

    with caplog.at_level(logging.ERROR, logger="asgi_sqla"), anyio.fail_after(15):
        async with anyio.create_task_group() as group:
            group.start_soon(request)
            # The deferred trigger keeps the backend in the COMMIT for a while.
            pid = await wait_for_active_query(pg_admin, "COMMIT%")
            pg_admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    [recorder] = results
    # The database went away under the COMMIT: unavailable, still no claim of success.
    assert starts(recorder) == [503]
    assert retry_after(recorder) == [b"1"]
    assert b"created" not in recorder.body
    assert any("failed to commit" in r.getMessage() for r in caplog.records)
    assert await keys(slow_db) == set()
    assert checked_out(slow_db) == 0
    await assert_next_request_commits(slow_db, "next")


# -- a deadline expiring during the COMMIT, or before it ----------------------------------


def deadline(
    app: ASGIApp, expire: Callable[[], Awaitable[None]], style: str, on_timeout: str
) -> ASGIApp:
    """``app`` under a request deadline, as apps add one (a middleware inside ours).

    The deadline expires when ``expire()`` returns, so that the test decides where it
    lands.  ``style``: an ``anyio`` cancel scope (``anyio.fail_after``'s mechanism) or
    one ``Task.cancel()`` (``asyncio.timeout``'s).  ``on_timeout``: "504" answers 504
    if no response has started yet; "raise" lets the ``TimeoutError`` reach the
    server, which answers 500 if nothing started.
    """

    async def under_anyio(scope: Scope, receive: Receive, send: Send) -> None:
        with anyio.CancelScope() as deadline_scope:
            async with anyio.create_task_group() as group:

                async def expire_deadline() -> None:
                    await expire()
                    deadline_scope.cancel()

                group.start_soon(expire_deadline)
                await app(scope, receive, send)
                group.cancel_scope.cancel()
        if deadline_scope.cancelled_caught:
            raise TimeoutError

    async def under_asyncio(scope: Scope, receive: Receive, send: Send) -> None:
        # One Task.cancel(), turned into TimeoutError: what asyncio.timeout() and
        # asyncio.wait_for() do (asyncio.timeout is Python 3.11+).
        task = asyncio.current_task()
        assert task is not None
        expired = False

        async def expire_deadline() -> None:
            nonlocal expired
            await expire()
            expired = True
            task.cancel()

        watcher = asyncio.ensure_future(expire_deadline())
        try:
            await app(scope, receive, send)
        except asyncio.CancelledError:
            if not expired:
                raise
            if sys.version_info >= (3, 11):
                task.uncancel()
            raise TimeoutError from None
        finally:
            watcher.cancel()

    under_deadline = under_anyio if style == "anyio" else under_asyncio

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_and_track(message: Message) -> None:
            nonlocal started
            await send(message)
            if message["type"] == "http.response.start":
                started = True

        try:
            await under_deadline(scope, receive, send_and_track)
        except TimeoutError:
            if started or on_timeout == "raise":
                raise
            await plain_response(send, 504, b"deadline exceeded")

    return wrapped


@pytest.mark.parametrize(("style", "on_timeout"), [("anyio", "504"), ("asyncio", "raise")])
async def test_a_deadline_expiring_during_the_commit_never_reports_a_committed_write_as_failed(
    slow_db: Database, pg_admin: psycopg.Connection[TupleRow], style: str, on_timeout: str
) -> None:
    """The status the client gets and the fate of the write must agree.

    The deadline expires while the COMMIT runs (it takes 0.5 s).  The package finishes
    the COMMIT, shielded, so the row is committed: the client must then be told a 2xx,
    not the deadline's 504, nor the 500 a server sends for an exception that reaches it
    before any response started.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(slow_db, "slow-deadline")
        await plain_response(send, 201, b"created")

    async def commit_running() -> None:
        await wait_for_active_query(pg_admin, "COMMIT%")

    app_under_deadline = deadline(app, commit_running, style, on_timeout)
    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    raised: list[BaseException] = []
    with anyio.fail_after(10):
        try:
            await recorder(SQLAlchemyMiddleware(app_under_deadline, slow_db), http_scope())
        except Exception as error:  # the server answers 500 if nothing started, else hangs up
            raised.append(error)
    committed = "slow-deadline" in await keys(slow_db)
    told = starts(recorder)[0] if starts(recorder) else 500

    assert checked_out(slow_db) == 0
    assert committed == (200 <= told < 300), (
        f"the client is told {told}, the row is {'' if committed else 'not '}committed; "
        f"the server got {recorder.types()}, the app raised {raised}"
    )


async def test_a_commit_that_fails_as_a_deadline_expires_is_still_reported_as_a_failed_commit(
    slow_db: Database,
    pg_admin: psycopg.Connection[TupleRow],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The COMMIT runs 0.5 s, then fails (a deferred foreign key); the deadline expires
    meanwhile.  The failure must not be lost behind the cancellation: it is logged as a
    failed commit, the client is told an error, nothing is committed, and asyncio has
    no "Task exception was never retrieved" to report.
    """
    async with slow_db.engine.begin() as connection:
        await connection.execute(text("CREATE TABLE parents (id INTEGER PRIMARY KEY)"))
        await connection.execute(
            text(
                "CREATE TABLE children (id SERIAL PRIMARY KEY, parent_id INTEGER NOT NULL "
                "REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(slow_db, "slow-doomed")  # the slow trigger runs first at COMMIT
        await slow_db.session.execute(text("INSERT INTO children (parent_id) VALUES (-1)"))
        await plain_response(send, 201, b"created")

    async def commit_running() -> None:
        await wait_for_active_query(pg_admin, "COMMIT%")

    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    app_under_deadline = deadline(app, commit_running, "anyio", "504")
    with caplog.at_level(logging.ERROR), anyio.fail_after(10):
        # An exception reaching the server before any start: it answers 500.
        with contextlib.suppress(Exception):
            await recorder(SQLAlchemyMiddleware(app_under_deadline, slow_db), http_scope())
        gc.collect()  # asyncio reports an unretrieved task exception when the task is freed
        await anyio.lowlevel.checkpoint()

    told = starts(recorder)[0] if starts(recorder) else 500
    assert not 200 <= told < 300
    assert await keys(slow_db) == set()
    assert checked_out(slow_db) == 0
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    assert not [m for m in messages if "never retrieved" in m[1]], messages
    assert [m for m in messages if m[0] == "asgi_sqla" and "failed to commit" in m[1]], messages


async def test_a_handler_timeout_before_the_response_answers_504_and_rolls_back(
    postgresql_url: str,
) -> None:
    db = Database(postgresql_url, pool_size=1, max_overflow=0)
    await create_tables(db)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with anyio.fail_after(0.1):
                await add_key(db, "timed-out")
                await db.session.execute(text("SELECT pg_sleep(5)"))
        except TimeoutError:
            await plain_response(send, 504, b"the handler timed out")
            return
        await plain_response(send, 201)

    try:
        with anyio.fail_after(10):
            recorder = await call_http(SQLAlchemyMiddleware(app, db))
        assert starts(recorder) == [504]
        assert await keys(db) == set()
        assert checked_out(db) == 0
        await assert_next_request_commits(db, "next")
    finally:
        await db.dispose()


# -- a PostgreSQL cluster of this module's own --------------------------------------------

#: The app role's password: it must never show in a log, an exception or a response.
SECRET = secrets.token_hex(12)


@pytest.fixture(scope="module")
def own_pg() -> Iterator[DedicatedPostgres]:
    """A cluster this module may stop and restart, with the role ``app`` (password SECRET)."""
    try:
        with DedicatedPostgres() as cluster:
            cluster.add_password_role("app", SECRET)
            # A role whose password is not SECRET: a URL with SECRET fails to log in.
            cluster.add_password_role("other", secrets.token_hex(12))
            yield cluster
    except _postgres.PostgresUnavailable as exc:
        postgres_unavailable(str(exc))


@pytest.fixture(
    params=[pytest.param(d, marks=pytest.mark.postgresql) for d in ("asyncpg", "psycopg")]
)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def own_database(own_pg: DedicatedPostgres) -> Iterator[URL]:
    """A fresh database owned by ``app``: its driver-less URL, password included."""
    database = f"t_{uuid.uuid4().hex}"
    name = sql.Identifier(database)
    with _postgres.connect(own_pg.admin) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} OWNER app TEMPLATE template0").format(name))
    try:
        yield own_pg.admin.set(username="app", password=SECRET, database=database)
    finally:
        if not own_pg.running:  # a failed test may have left it stopped
            own_pg.start()
        with _postgres.connect(own_pg.admin) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(name))


def async_url(url: URL, driver: str) -> str:
    return url.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


async def request_on(db: Database, key: str) -> ASGIRecorder:
    """One request that writes ``key`` and answers 201; raises what the app raised."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, key)
        await plain_response(send, 201)

    with anyio.fail_after(10):
        return await call_http(SQLAlchemyMiddleware(app, db))


# -- the database restarted, or down --------------------------------------------------------


async def test_with_pool_pre_ping_the_first_request_after_a_database_restart_succeeds(
    own_pg: DedicatedPostgres, own_database: URL, driver: str
) -> None:
    db = Database(async_url(own_database, driver), pool_size=1, pool_pre_ping=True)
    try:
        await create_tables(db)
        assert starts(await request_on(db, "before")) == [201]  # the pool now holds one

        await anyio.to_thread.run_sync(own_pg.restart)

        # The pooled connection is dead; the ping at checkout finds out and replaces it.
        assert starts(await request_on(db, "after")) == [201]
        assert await keys(db) == {"before", "after"}
        assert checked_out(db) == 0
    finally:
        await db.dispose()


async def test_without_pool_pre_ping_every_request_after_a_restart_succeeds(
    own_pg: DedicatedPostgres, own_database: URL, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The stale connection no longer fails the first request: its first statement runs
    again on a new connection (``_reconnect``), and SQLAlchemy discards every connection
    pooled before the failure, so the following requests get fresh ones.  One INFO line
    says so.  (tests/test_reconnect.py covers the drivers, killed backends, idle
    timeouts, and what is not run again.)
    """
    db = Database(async_url(own_database, driver), pool_size=3, max_overflow=0)
    try:
        await create_tables(db)
        await fill_pool(db, 3)

        await anyio.to_thread.run_sync(own_pg.restart)

        caplog.set_level(logging.INFO, logger="asgi_sqla")
        assert starts(await request_on(db, "first-after")) == [201]
        assert "pooled database connections were dead" in caplog.text
        assert "could not be reached" not in caplog.text
        assert checked_out(db) == 0
        for number in range(3):
            assert starts(await request_on(db, f"after-{number}")) == [201]
        assert await keys(db) == {"first-after", "after-0", "after-1", "after-2"}
        assert checked_out(db) == 0
    finally:
        await db.dispose()


async def fill_pool(db: Database, size: int) -> None:
    """Make ``db``'s pool hold ``size`` connections: as many requests at once."""
    all_in = anyio.Event()
    holding = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal holding
        await db.session.execute(text("SELECT 1"))
        holding += 1
        if holding == size:
            all_in.set()
        await all_in.wait()
        await plain_response(send, 200)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            for _ in range(size):
                group.start_soon(call_http, SQLAlchemyMiddleware(app, db))
    assert db.pool_status().checked_in == size


async def test_a_request_in_flight_during_a_restart_answers_503_and_commits_nothing(
    own_pg: DedicatedPostgres, own_database: URL, driver: str
) -> None:
    db = Database(async_url(own_database, driver), pool_size=1, pool_pre_ping=True)
    written = anyio.Event()
    restarted = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "in-flight")
        written.set()
        await restarted.wait()
        await plain_response(send, 201, b"created")

    results: list[ASGIRecorder] = []

    async def request() -> None:
        results.append(await call_http(SQLAlchemyMiddleware(app, db)))

    try:
        await create_tables(db)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                group.start_soon(request)
                await written.wait()
                await anyio.to_thread.run_sync(own_pg.restart)
                restarted.set()

        [recorder] = results
        assert (starts(recorder), retry_after(recorder)) == ([503], [b"1"])
        assert b"created" not in recorder.body
        assert checked_out(db) == 0
        assert await keys(db) == set()
        assert starts(await request_on(db, "after")) == [201]
        assert await keys(db) == {"after"}
    finally:
        await db.dispose()


async def test_while_the_database_is_down_requests_fail_at_once_and_it_recovers_after(
    own_pg: DedicatedPostgres, own_database: URL, driver: str
) -> None:
    db = Database(async_url(own_database, driver), pool_size=1, pool_timeout=5, pool_pre_ping=True)
    try:
        await create_tables(db)
        assert starts(await request_on(db, "before")) == [201]
        await anyio.to_thread.run_sync(own_pg.stop)
        try:
            began = anyio.current_time()
            down = await request_on(db, "while-down")
            assert (starts(down), retry_after(down)) == ([503], [b"1"])
            # Refused at once: not held until the pool timeout, no connection kept.
            assert anyio.current_time() - began < 5
            assert checked_out(db) == 0
        finally:
            await anyio.to_thread.run_sync(own_pg.start)
        assert starts(await request_on(db, "after")) == [201]
        assert await keys(db) == {"before", "after"}
        assert checked_out(db) == 0
    finally:
        await db.dispose()


# -- clients hanging up on a real server ----------------------------------------------------


@pytest.fixture(scope="module")
def served(own_pg: DedicatedPostgres) -> Iterator[Server]:
    """``apps/soak_app.py`` under uvicorn on the role ``app``'s database, warnings as errors."""
    url = own_pg.admin.set(username="app", password=SECRET, database="app")
    env = {
        "DATABASE_URL": async_url(url, "asyncpg"),
        "PYTHONWARNINGS": "error::RuntimeWarning",  # SAWarning is a RuntimeWarning
    }
    with serve("tests.apps.soak_app:app", "uvicorn", env=env, ready_path="/health") as server:
        yield server
    log = server.log
    assert server.returncode == 0, log
    assert SECRET not in log
    for warning in ("Invalid -W option", "non-checked-in", "never awaited", "Exception ignored"):
        assert warning not in log


def app_keys(own_pg: DedicatedPostgres) -> set[str]:
    url = own_pg.admin.set(database="app")
    with _postgres.connect(url) as conn:
        return {key for (key,) in conn.execute("SELECT key FROM items")}


def pool_checked_out(server: Server) -> int:
    return int(httpx.get(server.url + "/pool", timeout=10).json()["checked_out"])


def answers(server: Server) -> bool:
    """Whether the server still answers ``/health``."""
    return httpx.get(server.url + "/health", timeout=10).status_code == 200


def no_transaction_open(own_pg: DedicatedPostgres) -> bool:
    return not any(
        (state or "").startswith("idle in transaction") for _, state, _ in own_pg.backends("app")
    )


async def hang_up(server: Server, query: str, *, after: bytes | None) -> bytes:
    """POST ``/write?query`` over a raw socket; hang up once ``after`` was received.

    ``after`` None: right after sending the request.  Returns what was received.
    """
    port = int(server.url.rsplit(":", 1)[1])
    request = (
        f"POST /write?{query} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n"
    )
    received = b""
    with anyio.fail_after(10):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(request.encode())
            while after is not None and after not in received:
                received += await stream.receive()
    return received


async def test_a_client_hanging_up_mid_body_keeps_its_committed_write_and_leaks_nothing(
    served: Server, own_pg: DedicatedPostgres
) -> None:
    log_before = len(served.log)

    # Ten chunks 0.2 s apart: the client leaves after the first.
    received = await hang_up(served, "key=mid-body&fault=stream&ms=200", after=b"chunk 0;")

    assert received.startswith(b"HTTP/1.1 200 ")
    assert b"chunk 1;" not in received
    # The 200 went out after the COMMIT: the write is there.
    assert "mid-body" in app_keys(own_pg)
    assert eventually(lambda: pool_checked_out(served) == 0)
    assert eventually(lambda: no_transaction_open(own_pg))
    # The server noticed, stopped the body, and carries on, with nothing to complain about.
    assert answers(served)
    log = served.log[log_before:]
    assert "Traceback" not in log, log
    assert "WARNING" not in log, log


async def test_a_client_hanging_up_before_the_response_leaves_no_transaction_open(
    served: Server, own_pg: DedicatedPostgres
) -> None:
    """Nobody hears the answer, yet the request ends as its app decided: 201, committed.

    (A client that hung up cannot know: it must retry idempotently.)
    """
    log_before = len(served.log)

    received = await hang_up(served, "key=hung-up&fault=sleep&ms=300", after=None)

    assert received == b""
    assert eventually(lambda: "hung-up" in app_keys(own_pg))
    assert eventually(lambda: pool_checked_out(served) == 0)
    assert eventually(lambda: no_transaction_open(own_pg))
    assert answers(served)
    log = served.log[log_before:]
    assert "Traceback" not in log, log
    assert "WARNING" not in log, log


# -- the password, on every error path ------------------------------------------------------


async def test_no_error_path_shows_the_database_password(
    own_pg: DedicatedPostgres,
    own_database: URL,
    driver: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Startup failures, a failed commit, a pool timeout, a backend killed mid-commit,
    a restart mid-request, the database down, and the app raising: the password of the
    URL appears in no log record (every logger, at DEBUG), no exception or traceback
    that reaches the server, no lifespan message and no response.
    """
    caplog.set_level(logging.DEBUG)
    shown: list[str] = []  # everything a client, an operator or the server gets to see

    async def call(app: ASGIApp, scope: Scope, incoming: list[Message]) -> ASGIRecorder:
        recorder = ASGIRecorder(incoming)
        try:
            with anyio.fail_after(20):
                await recorder(app, scope)
        except Exception as error:
            shown.append("".join(traceback.format_exception(error)))
        shown.extend(repr(message) for message in recorder.sent)
        return recorder

    async def start(db: Database) -> list[str]:
        lifespan_scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        app = SQLAlchemyMiddleware(Starlette(), db)
        recorder = await call(app, lifespan_scope, [{"type": "lifespan.startup"}])
        shown.append(repr(db))
        return recorder.types()

    # Startup: no such database; a role whose password is not this one.
    for wrong in (
        own_database.set(database="no_such_database"),
        own_database.set(username="other"),
    ):
        assert await start(Database(async_url(wrong, driver))) == ["lifespan.startup.failed"]

    db = await open_slow_commit_database(
        async_url(own_database, driver), pool_timeout=0.2, pool_pre_ping=True
    )
    await create_children_table(db)
    holding, release, written, restarted = (anyio.Event() for _ in range(4))

    async def ok(request: Request) -> Response:
        await add_key(db, request.query_params["key"])
        return PlainTextResponse("created", status_code=201)

    async def doomed(request: Request) -> Response:
        await add_key(db, "doomed")
        await db.session.execute(text("INSERT INTO children (parent_id) VALUES (-1)"))
        return PlainTextResponse("created", status_code=201)

    async def hold(request: Request) -> Response:
        await db.session.execute(text("SELECT 1"))
        holding.set()
        await release.wait()
        return PlainTextResponse("held")

    async def wait(request: Request) -> Response:
        await add_key(db, "in-flight")
        written.set()
        await restarted.wait()
        return PlainTextResponse("created", status_code=201)

    async def fail(request: Request) -> Response:
        await add_key(db, "raised")
        raise RuntimeError("the app fails")

    routes = [("/ok", ok), ("/doomed", doomed), ("/hold", hold), ("/wait", wait), ("/fail", fail)]
    app = SQLAlchemyMiddleware(Starlette(routes=[Route(p, e) for p, e in routes]), db)
    request = [{"type": "http.request", "body": b"", "more_body": False}]

    async def get(path: str, query: str = "") -> int:
        scope = http_scope(path, query_string=query.encode())
        recorder = await call(app, scope, list(request))
        return starts(recorder)[0] if starts(recorder) else 500

    admin = _postgres.connect(own_pg.admin.set(database=own_database.database))
    try:
        assert await get("/ok", "key=works") == 201  # the password is right
        assert await get("/doomed") == 500  # the COMMIT fails
        assert await get("/fail") == 500  # the app raises

        async with anyio.create_task_group() as group:  # the pool times out
            group.start_soon(get, "/hold")
            await holding.wait()
            assert await get("/ok", "key=no-connection") == 503
            release.set()

        statuses: list[int] = []
        async with anyio.create_task_group() as group:  # the backend is killed mid-commit
            group.start_soon(lambda: _append(statuses, get("/ok", "key=slow-killed")))
            pid = await wait_for_active_query(admin, "COMMIT%")
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        admin.close()

        async with anyio.create_task_group() as group:  # the database restarts mid-request
            group.start_soon(lambda: _append(statuses, get("/wait")))
            await written.wait()
            await anyio.to_thread.run_sync(own_pg.restart)
            restarted.set()
        assert statuses == [503, 503]  # the database went away: 503 with Retry-After

        await anyio.to_thread.run_sync(own_pg.stop)  # the database is down
        try:
            assert await get("/ok", "key=while-down") == 503
            assert await start(Database(async_url(own_database, driver))) == [
                "lifespan.startup.failed"
            ]
        finally:
            await anyio.to_thread.run_sync(own_pg.start)
        assert await get("/ok", "key=back") == 201
        assert await keys(db) == {"works", "back"}
    finally:
        admin.close()
        await db.dispose()

    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    shown.extend(formatter.format(record) for record in caplog.records)
    # Every error path was taken, and what it showed was collected.
    everything = "\n".join(shown)
    for seen in (
        "does not exist",
        "password authentication failed",
        "failed to commit",
        "No database connection was free",
        "the app fails",
        "terminating connection",
        "refused" if driver == "psycopg" else "Connect call failed",
        "Traceback",
    ):
        assert seen in everything
    assert [text for text in shown if SECRET in text] == []


async def _append(results: list[int], status: Awaitable[int]) -> None:
    results.append(await status)


async def create_children_table(db: Database) -> None:
    """``children``: its foreign key is checked at COMMIT, so an orphan fails the COMMIT."""
    async with db.engine.begin() as connection:
        await connection.execute(text("CREATE TABLE parents (id INTEGER PRIMARY KEY)"))
        await connection.execute(
            text(
                "CREATE TABLE children (id SERIAL PRIMARY KEY, parent_id INTEGER NOT NULL "
                "REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
