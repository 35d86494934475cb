"""Cancelling a request while its ``def`` code is inside a statement (``SyncDatabase``).

Frameworks run ``def`` code in worker threads, and a thread cannot be interrupted, so
what a cancelled request does depends on how its framework waits for the thread:

* ``asyncio.to_thread`` and ``loop.run_in_executor`` (Quart's ``run_sync``) abandon the
  thread: the request's task unwinds through the middleware at once, while the thread
  is still inside its statement.  The middleware's ending waits for the thread (one
  call at a time on a session) and, since it rolls back, first cancels the statement on
  the server (psycopg's ``cancel_safe()``, psycopg2's ``cancel()``, sqlite3's
  ``interrupt()``): the connection comes back in milliseconds, not when the statement
  would have ended.  anyio's ``to_thread.run_sync`` behaves the same under a plain
  ``Task.cancel()`` (``asyncio.timeout``, a server cancelling the request's task): its
  shield holds off anyio cancel scopes only.
* Under an anyio cancel scope (``anyio.fail_after``, a task group: Starlette's and
  FastAPI's ``def`` endpoints run in ``anyio.to_thread.run_sync``), the wait for the
  thread is shielded: the request's task cannot unwind before the thread returns, so
  the statement runs to its end, and the app carries on to its response, which the
  middleware commits as for any request cancelled at response start.

The pool is one connection (no overflow): the request after a cancelled one works
only if that connection came back, usable.  Each test prints how long the cancelled
request kept its connection, from the cancellation to the pool's checkin (``pytest
-rP`` shows the figures).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import event, text

from asgi_sqla import SQLAlchemyMiddleware, SyncDatabase
from asgi_sqla.types import Receive, Scope, Send

from _helpers import (
    CANCEL_STYLES,
    ASGIRecorder,
    Cancel,
    call_http,
    cancel_request,
    http_scope,
    items,
    open_slow_commit_sync_database,
    open_sync_database,
    plain_response,
    settled_backends,
    sync_checked_out,
    sync_keys,
    wait_for_active_query,
    when_running,
)

pytestmark = pytest.mark.anyio

#: Seconds of the statement a cancelled request's thread is inside, unless cancelled.
LONG_SECONDS = 30
#: Seconds of the statement that the anyio path lets run to its end.
SHORT_SECONDS = 1
#: Rows SQLite counts in a second on this machine (10 million take 1.4 s), roughly.
SQLITE_ROWS_PER_SECOND = 7_000_000


class Statement:
    """A statement of about ``seconds`` on ``db``'s backend, and a way to wait until it runs.

    PostgreSQL: ``pg_sleep``, seen running in ``pg_stat_activity``.  SQLite: a recursive
    count whose first row calls ``statement_started()``, a function that sets a
    ``threading.Event``: an ``interrupt()`` that came before the statement runs would
    be lost (``sqlite3_interrupt`` does nothing while no statement runs).
    """

    def __init__(self, db: SyncDatabase, admin: Any, seconds: float) -> None:
        self.admin = admin
        self.started = threading.Event()
        if admin is None:
            rows = int(seconds * SQLITE_ROWS_PER_SECOND)
            self.sql = (
                "WITH RECURSIVE c(x) AS (SELECT statement_started() UNION ALL "
                f"SELECT x + 1 FROM c WHERE x < {rows}) SELECT count(*) FROM c"
            )
            event.listen(db.engine, "connect", self._define_function)
            db.engine.dispose()  # the pooled connection that made the tables lacks it
        else:
            self.sql = f"SELECT pg_sleep({seconds})"

    def _define_function(self, dbapi_connection: Any, record: Any) -> None:
        def statement_started() -> int:
            self.started.set()
            return 1

        dbapi_connection.create_function("statement_started", 0, statement_started)

    async def running(self) -> None:
        """Return once the statement runs (on the server, or in SQLite's engine)."""
        if self.admin is not None:
            await wait_for_active_query(self.admin, "%pg_sleep%")
        else:
            assert await anyio.to_thread.run_sync(self.started.wait, 5)


@pytest.fixture
def db(sync_database_url: str) -> Iterator[SyncDatabase]:
    database = open_sync_database(sync_database_url, pool_size=1, max_overflow=0, pool_timeout=5)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def admin(db: SyncDatabase, request: pytest.FixtureRequest) -> Any:
    """``pg_admin`` for PostgreSQL, None for SQLite (no server to look at)."""
    if db.engine.dialect.name == "sqlite":
        return None
    return request.getfixturevalue("pg_admin")


class Checkins:
    """``time.monotonic()`` of every connection ``db``'s pool took back from now on."""

    def __init__(self, db: SyncDatabase) -> None:
        self.times: list[float] = []
        event.listen(db.engine, "checkin", self._on_checkin)

    def _on_checkin(self, *args: Any) -> None:
        self.times.append(time.monotonic())


def report(request: pytest.FixtureRequest, held: float) -> None:
    """Print how long the cancelled request kept its connection (``pytest -rP`` shows it)."""
    print(f"{request.node.name}: connection held {held * 1000:.1f} ms after the cancellation")


async def assert_next_request_works(db: SyncDatabase, key: str = "next") -> None:
    """A request on the pool of one connection commits (it is not stuck, nor broken)."""

    def write() -> None:
        db.session.execute(items.insert().values(key=key))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(write)
        await plain_response(send, 201)

    with anyio.fail_after(10):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))
    assert recorder.status == 201
    assert key in sync_keys(db)
    assert sync_checked_out(db) == 0


#: How frameworks wait for a ``def`` function's thread.
RUNNERS: dict[str, Callable[[Callable[[], None]], Awaitable[None]]] = {
    "to_thread": asyncio.to_thread,  # loop.run_in_executor, as Quart's run_sync
    "anyio": anyio.to_thread.run_sync,  # Starlette's and FastAPI's run_in_threadpool
}


@pytest.mark.parametrize(
    ("runner", "style"),
    [("to_thread", "task-cancel"), ("to_thread", "cancel-scope"), ("anyio", "task-cancel")],
)
async def test_a_request_cancelled_while_its_thread_runs_a_statement_cancels_it_and_rolls_back(
    db: SyncDatabase, admin: Any, runner: str, style: str, request: pytest.FixtureRequest
) -> None:
    """The request's task unwinds while its thread is inside a 30 s statement.

    It is cancelled once while the thread runs the statement, and again while the
    middleware's ending rolls back.  The ending waits for the thread (the connection
    comes back only after the thread's call returned), is not cut short by the second
    cancellation (the request's task unwinds only after the checkin), and cancels the
    statement on the server instead of waiting it out.
    """
    statement = Statement(db, admin, LONG_SECONDS)
    checkins = Checkins(db)
    loop = asyncio.get_running_loop()
    thread_returned: list[float] = []
    cancelled_at: list[float] = []
    cancels: list[Cancel] = []
    cancelled_again = threading.Event()

    def work() -> None:
        try:
            db.session.execute(items.insert().values(key="cancelled"))
            db.session.execute(text(statement.sql))
        finally:
            thread_returned.append(time.monotonic())

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await RUNNERS[runner](work)
        await plain_response(send, 201)

    def cancel_again() -> None:
        cancels[0]()
        cancelled_again.set()

    def on_rollback(connection: Any) -> None:
        # In the package's ending thread, after the app's thread returned: cancel the
        # request once more, and roll back only once the event loop has done it.
        if not cancelled_again.is_set():
            loop.call_soon_threadsafe(cancel_again)
            cancelled_again.wait(5)

    async def trigger(cancel: Cancel) -> None:
        cancels.append(cancel)
        await statement.running()
        cancelled_at.append(time.monotonic())
        cancel()

    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    wrapped = SQLAlchemyMiddleware(app, db)
    event.listen(db.engine, "rollback", on_rollback)
    try:
        ended = await cancel_request(style, lambda: recorder(wrapped, http_scope()), trigger)
    finally:
        event.remove(db.engine, "rollback", on_rollback)

    assert cancelled_again.is_set()  # the premise: cancelled twice
    [cancelled] = cancelled_at
    [returned] = thread_returned
    [checkin] = checkins.times
    report(request, checkin - cancelled)
    assert cancelled < returned <= checkin <= ended
    assert checkin - cancelled < 5  # well under the statement's 30 s: it was cancelled
    assert recorder.sent == []
    assert sync_checked_out(db) == 0
    if admin is not None:
        assert await settled_backends(admin) == []  # no idle in transaction, no query
    assert sync_keys(db) == set()
    await assert_next_request_works(db)


async def test_under_an_anyio_cancel_scope_the_statement_runs_to_its_end_then_the_request_ends(
    db: SyncDatabase, admin: Any, request: pytest.FixtureRequest
) -> None:
    """Starlette's and FastAPI's ``def`` endpoints under a deadline (``anyio.fail_after``).

    ``anyio.to_thread.run_sync`` shields its wait for the thread from the scope's
    cancellation, so nothing can stop the statement (the middleware does not know the
    request was cancelled until the app gives it control again): the request keeps its
    connection until the statement's end.  Then the app starts its 201 response; the
    middleware commits, shielded from the cancellation delivered again meanwhile, and
    sends only that true status line (as for any request cancelled as its response
    starts).
    """
    statement = Statement(db, admin, SHORT_SECONDS)
    checkins = Checkins(db)
    began: list[float] = []
    returned: list[float] = []
    cancelled_at: list[float] = []

    def work() -> None:
        db.session.execute(items.insert().values(key="cancelled"))
        began.append(time.monotonic())
        db.session.execute(text(statement.sql))  # no error: it ran to its end
        returned.append(time.monotonic())

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(work)
        await plain_response(send, 201)

    async def trigger(cancel: Cancel) -> None:
        await statement.running()
        cancelled_at.append(time.monotonic())
        cancel()

    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    wrapped = SQLAlchemyMiddleware(app, db)
    ended = await cancel_request("cancel-scope", lambda: recorder(wrapped, http_scope()), trigger)

    [cancelled] = cancelled_at
    [checkin] = checkins.times
    report(request, checkin - cancelled)
    assert cancelled < returned[0] <= checkin <= ended
    if admin is not None:  # a pg_sleep that ends early was cancelled
        assert returned[0] - began[0] >= SHORT_SECONDS
    assert recorder.sent == [{"type": "http.response.start", "status": 201, "headers": []}]
    assert sync_keys(db) == {"cancelled"}
    assert sync_checked_out(db) == 0
    if admin is not None:
        assert await settled_backends(admin) == []
    await assert_next_request_works(db)


@pytest.fixture
def slow_db(sync_postgresql_url: str) -> Iterator[SyncDatabase]:
    database = open_slow_commit_sync_database(sync_postgresql_url)
    try:
        yield database
    finally:
        database.dispose()


@pytest.mark.parametrize("style", CANCEL_STYLES)
async def test_a_request_cancelled_mid_commit_finishes_the_commit_and_sends_only_its_status(
    slow_db: SyncDatabase, pg_admin: Any, style: str
) -> None:
    """The COMMIT runs in the package's own thread, at response start; the request is
    cancelled meanwhile.  The commit is not abandoned halfway (nor is its thread left
    holding the connection): it finishes, and the client gets the status it decided,
    and nothing after it.
    """

    def work() -> None:
        slow_db.session.execute(items.insert().values(key="slow-commit"))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(work)
        await plain_response(send, 201)

    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    wrapped = SQLAlchemyMiddleware(app, slow_db)
    await cancel_request(
        style, lambda: recorder(wrapped, http_scope()), when_running(pg_admin, "COMMIT%")
    )

    assert recorder.sent == [{"type": "http.response.start", "status": 201, "headers": []}]
    assert sync_keys(slow_db) == {"slow-commit"}
    assert sync_checked_out(slow_db) == 0
    assert await settled_backends(pg_admin) == []
    await assert_next_request_works(slow_db)
