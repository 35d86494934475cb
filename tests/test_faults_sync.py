"""Database faults under ``def`` code: the faults of tests/test_faults.py, for ``SyncDatabase``.

On PostgreSQL through psycopg 3 (used synchronously) and psycopg 2, with Starlette
``def`` endpoints in process (Starlette runs them in ``anyio.to_thread.run_sync``; its
``ServerErrorMiddleware`` answers 500 for an exception and then re-raises it, as it
does for the server's log): a backend killed mid-statement and mid-commit, a COMMIT
that fails, the pool running dry (503 with Retry-After), the framework's thread limiter
and the pool disagreeing in both directions, and the database restarted or down.
Every test ends with no connection checked out.

Cancellation of ``def`` code is in tests/test_cancellation_sync.py; the promises on
SQLite and the failed commit of a raw ASGI app in tests/test_sync.py.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql
from psycopg.rows import TupleRow
from sqlalchemy import URL, event, text
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_sqla import SQLAlchemyMiddleware, SyncDatabase
from asgi_sqla.types import ASGIApp

import _postgres
from _helpers import (
    ASGIRecorder,
    DedicatedPostgres,
    http_scope,
    items,
    open_slow_commit_sync_database,
    open_sync_database,
    postgres_unavailable,
    settled_backends,
    sync_checked_out,
    sync_keys,
    wait_for_active_query,
)

pytestmark = pytest.mark.anyio

#: A Starlette endpoint: ``def`` (run in a worker thread), or ``async def``.
Endpoint = Callable[[Request], Response | Awaitable[Response]]


def starlette_app(db: SyncDatabase, *routes: tuple[str, Endpoint], **options: Any) -> ASGIApp:
    """A Starlette app of ``def`` endpoints, with the middleware mounted the usual way."""
    return Starlette(
        routes=[Route(path, endpoint) for path, endpoint in routes],
        middleware=[Middleware(SQLAlchemyMiddleware, db, **options)],
    )


class Answer:
    """What the server got for one request, and the exception the app let out, if any."""

    def __init__(self, recorder: ASGIRecorder, error: Exception | None) -> None:
        self.recorder = recorder
        self.error = error

    @property
    def status(self) -> int | None:
        """The status line's code; None if the app sent none (the server would say 500)."""
        starts = [m for m in self.recorder.sent if m["type"] == "http.response.start"]
        return int(starts[0]["status"]) if starts else None

    @property
    def retry_after(self) -> list[bytes]:
        start = next(m for m in self.recorder.sent if m["type"] == "http.response.start")
        return [value for name, value in start["headers"] if name.lower() == b"retry-after"]


async def call(app: ASGIApp, path: str = "/", query: str = "") -> Answer:
    """One request, as a server makes it."""
    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    error: Exception | None = None
    with anyio.fail_after(20):
        try:
            await recorder(app, http_scope(path, query_string=query.encode()))
        except Exception as raised:  # a server logs it (and answers 500 if nothing started)
            error = raised
    return Answer(recorder, error)


def add(db: SyncDatabase, key: str) -> None:
    """Insert ``key`` into ``items`` through ``db.session`` (in the request's thread)."""
    db.session.execute(items.insert().values(key=key))


def write(db: SyncDatabase) -> Endpoint:
    """``def`` endpoint: write the ``key`` of the query string, answer 201."""

    def endpoint(request: Request) -> Response:
        add(db, request.query_params.get("key", "written"))
        return PlainTextResponse("created", status_code=201)

    return endpoint


async def assert_next_request_commits(db: SyncDatabase, key: str = "next") -> None:
    """A plain ``def`` request answers 201 and its row is committed."""
    answer = await request_on(db, key)
    assert answer.status == 201
    assert key in sync_keys(db)
    assert sync_checked_out(db) == 0


@pytest.fixture
def db(sync_postgresql_url: str) -> Iterator[SyncDatabase]:
    """One connection, no overflow; a COMMIT of a "slow…" key takes 0.5 s."""
    database = open_slow_commit_sync_database(sync_postgresql_url, pool_timeout=0.2)
    try:
        yield database
    finally:
        database.dispose()


# -- a backend killed, a COMMIT that fails ----------------------------------------------------


async def test_a_backend_killed_mid_statement_answers_503_and_commits_nothing(
    db: SyncDatabase, pg_admin: psycopg.Connection[TupleRow], caplog: pytest.LogCaptureFixture
) -> None:
    def endpoint(request: Request) -> Response:
        add(db, "killed")
        db.session.execute(text("SELECT pg_sleep(10)"))
        return PlainTextResponse("created", status_code=201)

    app = starlette_app(db, ("/", endpoint))
    with caplog.at_level(logging.WARNING, logger="asgi_sqla"):
        async with anyio.create_task_group() as group:
            answers: list[Answer] = []
            group.start_soon(lambda: _append(answers, call(app)))
            pid = await wait_for_active_query(pg_admin, "%pg_sleep(10)%")
            pg_admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    [answer] = answers
    # The connection was lost (invalidated, not pooled again): the database was
    # unavailable, and the middleware made Starlette's 500 a 503 with Retry-After.
    assert (answer.status, answer.retry_after) == (503, [b"1"])
    assert b"created" not in answer.recorder.body
    assert answer.error is None  # answered by the middleware
    assert "The database could not be reached" in caplog.text
    assert sync_keys(db) == set()
    assert sync_checked_out(db) == 0
    assert await settled_backends(pg_admin) == []
    await assert_next_request_commits(db)


async def test_a_backend_killed_mid_commit_answers_503_and_commits_nothing(
    db: SyncDatabase,
    pg_admin: psycopg.Connection[TupleRow],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The COMMIT runs in the package's thread at response start; its backend dies."""
    app = starlette_app(db, ("/", write(db)))
    answers: list[Answer] = []
    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: _append(answers, call(app, query="key=slow-killed")))
            pid = await wait_for_active_query(pg_admin, "COMMIT%")
            pg_admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    [answer] = answers
    assert (answer.status, answer.retry_after) == (503, [b"1"])
    assert b"created" not in answer.recorder.body
    assert any("failed to commit" in r.getMessage() for r in caplog.records)
    assert sync_keys(db) == set()
    assert sync_checked_out(db) == 0
    assert await settled_backends(pg_admin) == []
    await assert_next_request_commits(db)


async def test_a_failing_commit_answers_500_commits_nothing_and_runs_no_background_task(
    db: SyncDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """A Starlette ``def`` endpoint's 201 whose COMMIT fails (a deferred foreign key)."""
    ran: list[str] = []

    def endpoint(request: Request) -> Response:
        add(db, "doomed")
        db.session.execute(text("INSERT INTO children (id, parent_id) VALUES (1, 999)"))
        task = BackgroundTask(ran.append, "background task")
        return PlainTextResponse("created", status_code=201, background=task)

    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        answer = await call(starlette_app(db, ("/", endpoint)))

    assert answer.status == 500
    assert b"created" not in answer.recorder.body
    assert answer.error is None  # answered and logged by the middleware, not the server
    assert ran == []
    assert any("failed to commit" in r.getMessage() for r in caplog.records)
    assert sync_keys(db) == set()
    assert sync_checked_out(db) == 0


async def _append(answers: list[Answer], answer: Any) -> None:
    answers.append(await answer)


# -- the pool runs dry --------------------------------------------------------------------


async def test_a_def_request_that_gets_no_connection_answers_503_with_retry_after(
    db: SyncDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """Pool of one, 0.2 s timeout: one request holds the connection, another asks."""
    holding = threading.Event()
    release = threading.Event()

    def hold(request: Request) -> Response:
        db.session.execute(text("SELECT 1"))
        holding.set()
        release.wait(10)  # set by the test once the other request was answered
        return PlainTextResponse("held")

    def ask(request: Request) -> Response:
        db.session.execute(text("SELECT 2"))
        return PlainTextResponse("never")

    app = starlette_app(db, ("/hold", hold), ("/ask", ask), retry_after=3)
    answers: list[Answer] = []
    with caplog.at_level(logging.WARNING, logger="asgi_sqla"):
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: _append(answers, call(app, "/hold")))
            assert await anyio.to_thread.run_sync(holding.wait, 10)
            try:
                unavailable = await call(app, "/ask")
            finally:
                release.set()

    assert unavailable.status == 503
    assert unavailable.retry_after == [b"3"]
    assert unavailable.error is None
    assert [answer.status for answer in answers] == [200]
    assert any("No database connection was free" in r.getMessage() for r in caplog.records)
    assert sync_checked_out(db) == 0


# -- the framework's thread limiter and the pool disagree ---------------------------------


@pytest.fixture
async def thread_limiter() -> Any:
    """anyio's default thread limiter of this event loop; its size is restored afterwards."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    total = limiter.total_tokens
    try:
        yield limiter
    finally:
        limiter.total_tokens = total


@pytest.fixture
def pool_of(sync_postgresql_url: str) -> Iterator[Callable[..., SyncDatabase]]:
    """``pool_of(size, timeout)``: a ``SyncDatabase`` with that pool (no overflow, no tables)."""
    made: list[SyncDatabase] = []

    def make(size: int, timeout: float) -> SyncDatabase:
        database = SyncDatabase(
            sync_postgresql_url, pool_size=size, max_overflow=0, pool_timeout=timeout
        )
        made.append(database)
        return database

    try:
        yield make
    finally:
        for database in made:
            database.dispose()


async def test_with_40_threads_and_2_connections_the_excess_answers_503_at_the_pool_timeout(
    pool_of: Callable[..., SyncDatabase], thread_limiter: Any
) -> None:
    """anyio's 40 threads, a pool of 2 (1 s timeout): 40 ``def`` requests each hold a
    connection until the test has seen the others answered.  The 38 that get none
    answer 503 once the pool timeout is up (not later: nothing waits for a thread),
    then the 2 holders finish; nothing deadlocks.
    """
    db = pool_of(2, timeout=1)
    thread_limiter.total_tokens = 40  # anyio's default
    release = threading.Event()

    def hold(request: Request) -> Response:
        db.session.execute(text("SELECT 1"))
        release.wait(10)  # set by the test once every other request was answered
        return PlainTextResponse("held")

    app = starlette_app(db, ("/", hold))
    answers: list[tuple[Answer, float]] = []
    all_but_two = anyio.Event()

    async def one() -> None:
        began = time.monotonic()
        answer = await call(app)
        answers.append((answer, time.monotonic() - began))
        if len(answers) == 38:
            all_but_two.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            for _ in range(40):
                group.start_soon(one)
            await all_but_two.wait()
            release.set()

    statuses = sorted(answer.status or 500 for answer, _ in answers)
    assert statuses == [200] * 2 + [503] * 38
    refused = [seconds for answer, seconds in answers if answer.status == 503]
    assert all(answer.retry_after == [b"1"] for answer, _ in answers if answer.status == 503)
    print(f"503 after {min(refused):.2f} to {max(refused):.2f} s (pool timeout 1 s)")
    assert max(refused) < 3  # about the pool timeout
    assert sync_checked_out(db) == 0


async def test_the_endings_do_not_wait_for_the_frameworks_threads(
    pool_of: Callable[..., SyncDatabase], thread_limiter: Any
) -> None:
    """All 40 of anyio's threads wait for a connection held by two requests (a long
    pool timeout); when those two start their responses, their COMMITs must run at
    once, in the package's own threads: waiting for one of anyio's would wait until a
    waiting thread gave up, at the pool timeout.
    """
    db = pool_of(2, timeout=10)
    thread_limiter.total_tokens = 40
    holding = threading.Barrier(3)  # the two holders and the test
    release = anyio.Event()
    waiting = 0
    lock = threading.Lock()
    all_waiting = threading.Event()

    def hold_connection() -> None:
        db.session.execute(text("SELECT 1"))
        holding.wait(10)

    async def hold(request: Request) -> Response:
        # A def dependency's work, then an async endpoint that keeps the transaction.
        await anyio.to_thread.run_sync(hold_connection)
        await release.wait()
        return PlainTextResponse("held")

    def wait_for_connection(request: Request) -> Response:
        nonlocal waiting
        with lock:
            waiting += 1
            if waiting == 40:
                all_waiting.set()
        db.session.execute(text("SELECT 2"))
        return PlainTextResponse("served")

    app = starlette_app(db, ("/hold", hold), ("/wait", wait_for_connection))
    answers: list[Answer] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            for _ in range(2):
                group.start_soon(lambda: _append(answers, call(app, "/hold")))
            # A limiter of its own for these waits: anyio's is about to be full.
            own = anyio.CapacityLimiter(1)
            await anyio.to_thread.run_sync(holding.wait, 10, limiter=own)
            for _ in range(40):
                group.start_soon(lambda: _append(answers, call(app, "/wait")))
            assert await anyio.to_thread.run_sync(all_waiting.wait, 10, limiter=own)
            assert thread_limiter.borrowed_tokens == 40
            began = time.monotonic()
            release.set()
    served_in = time.monotonic() - began

    print(f"42 requests served {served_in:.2f} s after the holders let go")
    assert sorted(answer.status or 500 for answer in answers) == [200] * 42
    assert served_in < 5  # not the 10 s pool timeout
    assert sync_checked_out(db) == 0


async def test_with_2_threads_and_10_connections_requests_queue_for_threads_and_none_fails(
    pool_of: Callable[..., SyncDatabase], thread_limiter: Any
) -> None:
    """A request waiting for a thread holds no connection (its session opens in the
    thread): 20 of them queue behind a limiter of 2, and every one is served.

    The requests go through two at a time, each pair meeting at a barrier while it
    holds its connections: a limiter letting fewer through would break the barrier
    (a 500), one letting more through would show in the peak.  Every connection is
    checked out by a request in its thread; it goes back when the request's commit
    has run, under the package's own thread limit, so the pair after it may already
    hold theirs meanwhile.
    """
    db = pool_of(10, timeout=1)
    thread_limiter.total_tokens = 2
    pair = threading.Barrier(2)
    lock = threading.Lock()  # pool events and endpoints run in several threads
    in_work = threading.local()
    running = peak_running = 0
    checkouts: list[bool] = []  # for each checkout: made by a request in its thread?

    def on_checkout(*args: Any) -> None:
        with lock:
            checkouts.append(getattr(in_work, "flag", False))

    def work(request: Request) -> Response:
        nonlocal running, peak_running
        with lock:
            running += 1
            peak_running = max(peak_running, running)
        in_work.flag = True
        try:
            db.session.execute(text("SELECT 1"))
            pair.wait(10)
        finally:
            in_work.flag = False
            with lock:
                running -= 1
        return PlainTextResponse("served")

    event.listen(db.engine, "checkout", on_checkout)
    app = starlette_app(db, ("/", work))
    answers: list[Answer] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            for _ in range(20):
                group.start_soon(lambda: _append(answers, call(app)))
    assert [answer.status for answer in answers] == [200] * 20
    assert peak_running == 2
    assert checkouts == [True] * 20
    assert sync_checked_out(db) == 0


# -- the database restarted, or down (a cluster of this module's own) ---------------------


@pytest.fixture(scope="module")
def own_pg() -> Iterator[DedicatedPostgres]:
    """A cluster this module may stop and restart."""
    try:
        with DedicatedPostgres() as cluster:
            yield cluster
    except _postgres.PostgresUnavailable as error:
        postgres_unavailable(str(error))


@pytest.fixture(
    params=[pytest.param(d, marks=pytest.mark.postgresql) for d in ("psycopg", "psycopg2")]
)
def own_url(request: pytest.FixtureRequest, own_pg: DedicatedPostgres) -> Iterator[str]:
    """A fresh database on ``own_pg``: its URL with the synchronous driver of the param."""
    database = f"t_{uuid.uuid4().hex}"
    name = sql.Identifier(database)
    with _postgres.connect(own_pg.admin) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(name))
    try:
        url: URL = own_pg.admin.set(drivername=f"postgresql+{request.param}", database=database)
        yield url.render_as_string(hide_password=False)
    finally:
        if not own_pg.running:  # a failed test may have left it stopped
            own_pg.start()
        with _postgres.connect(own_pg.admin) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(name))


async def request_on(db: SyncDatabase, key: str) -> Answer:
    """One ``def`` request that writes ``key`` and answers 201."""
    return await call(starlette_app(db, ("/", write(db))), query=f"key={key}")


async def test_with_pool_pre_ping_the_first_request_after_a_database_restart_succeeds(
    own_pg: DedicatedPostgres, own_url: str
) -> None:
    db = open_sync_database(own_url, pool_size=1, pool_pre_ping=True)
    try:
        assert (await request_on(db, "before")).status == 201  # the pool now holds one

        await anyio.to_thread.run_sync(own_pg.restart)

        # The pooled connection is dead; the ping at checkout finds out and replaces it.
        assert (await request_on(db, "after")).status == 201
        assert sync_keys(db) == {"before", "after"}
        assert sync_checked_out(db) == 0
    finally:
        db.dispose()


async def test_without_pool_pre_ping_every_request_after_a_restart_succeeds(
    own_pg: DedicatedPostgres, own_url: str
) -> None:
    """The stale connection no longer fails the first request: its first statement runs
    again on a new connection (``_reconnect``); SQLAlchemy then discards every connection
    pooled before the disconnect, so the following requests get fresh ones.
    """
    db = open_sync_database(own_url, pool_size=3, max_overflow=0)
    try:
        await fill_pool(db, 3)

        await anyio.to_thread.run_sync(own_pg.restart)

        first = await request_on(db, "first-after")
        assert (first.status, first.error) == (201, None)
        assert sync_checked_out(db) == 0
        for number in range(3):
            assert (await request_on(db, f"after-{number}")).status == 201
        assert sync_keys(db) == {"first-after", "after-0", "after-1", "after-2"}
        assert sync_checked_out(db) == 0
    finally:
        db.dispose()


async def fill_pool(db: SyncDatabase, size: int) -> None:
    """Make ``db``'s pool hold ``size`` connections: as many ``def`` requests at once."""
    all_in = threading.Barrier(size)

    def hold(request: Request) -> Response:
        db.session.execute(text("SELECT 1"))
        all_in.wait(10)
        return PlainTextResponse("held")

    app = starlette_app(db, ("/", hold))
    answers: list[Answer] = []
    async with anyio.create_task_group() as group:
        for _ in range(size):
            group.start_soon(lambda: _append(answers, call(app)))
    assert [answer.status for answer in answers] == [200] * size
    assert db.pool_status().checked_in == size


async def test_a_request_in_flight_during_a_restart_answers_503_and_commits_nothing(
    own_pg: DedicatedPostgres, own_url: str
) -> None:
    db = open_sync_database(own_url, pool_size=1, pool_pre_ping=True)
    written = threading.Event()
    restarted = threading.Event()

    def endpoint(request: Request) -> Response:
        add(db, "in-flight")
        written.set()
        restarted.wait(20)  # set by the test once the database is back
        return PlainTextResponse("created", status_code=201)

    app = starlette_app(db, ("/", endpoint))
    answers: list[Answer] = []
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: _append(answers, call(app)))
            assert await anyio.to_thread.run_sync(written.wait, 10)
            try:
                await anyio.to_thread.run_sync(own_pg.restart)
            finally:
                restarted.set()

        [answer] = answers
        # The COMMIT at response start failed: the database was unavailable.
        assert (answer.status, answer.retry_after) == (503, [b"1"])
        assert b"created" not in answer.recorder.body
        assert sync_checked_out(db) == 0
        assert sync_keys(db) == set()
        assert (await request_on(db, "after")).status == 201
        assert sync_keys(db) == {"after"}
        assert sync_checked_out(db) == 0
    finally:
        db.dispose()


async def test_while_the_database_is_down_requests_fail_at_once_and_it_recovers_after(
    own_pg: DedicatedPostgres, own_url: str
) -> None:
    db = open_sync_database(own_url, pool_size=1, pool_timeout=5, pool_pre_ping=True)
    try:
        assert (await request_on(db, "before")).status == 201
        await anyio.to_thread.run_sync(own_pg.stop)
        try:
            began = time.monotonic()
            down = await request_on(db, "while-down")
            # Refused at once: not held until the pool timeout, no connection kept.
            assert time.monotonic() - began < 5
            assert (down.status, down.retry_after) == (503, [b"1"])
            assert down.error is None  # answered by the middleware
            assert sync_checked_out(db) == 0
        finally:
            await anyio.to_thread.run_sync(own_pg.start)
        assert (await request_on(db, "after")).status == 201
        assert sync_keys(db) == {"before", "after"}
        assert sync_checked_out(db) == 0
    finally:
        db.dispose()
