"""Lifespan: engines start before the app's startup and are disposed after its shutdown.

``LifespanServer`` plays the server the way uvicorn does: ``lifespan.startup``; if the
startup completed, the test's ``while_up`` step, then ``lifespan.shutdown``; after a
failed startup the server exits, cancelling an app that is still waiting.  Every test
asserts the exact sequence of messages the server got: never two terminal messages.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import QueuePool
from starlette.applications import Starlette

from asgi_sqla import STATE_KEY, AsgiSqlaError, Database, DatabaseStartupError, SQLAlchemyMiddleware
from asgi_sqla.types import ASGIApp, Message, Receive, Scope, Send

from _helpers import call_http, items, metadata, plain_response, started_engine

pytestmark = pytest.mark.anyio

STARTUP_COMPLETE: Message = {"type": "lifespan.startup.complete"}
SHUTDOWN_COMPLETE: Message = {"type": "lifespan.shutdown.complete"}
_STARTUP_ANSWERS = ("lifespan.startup.complete", "lifespan.startup.failed")
PASSWORD = "s3cret"


class Boom(Exception):
    """Raised by the test apps."""


class LifespanFailureError(Exception):
    """What hypercorn's send() raises when it gets ``lifespan.startup.failed``."""


class LifespanServer:
    """The server side of one lifespan conversation.

    ``on_send`` runs as each message reaches the server (after it is recorded) and may
    raise, as hypercorn's send does on ``startup.failed``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        on_send: Callable[[Message], Awaitable[None] | None] | None = None,
        clear_state_before_shutdown: bool = False,
        with_state: bool = True,
    ) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self.scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        if with_state:
            self.scope["state"] = self.state
        self.sent: list[Message] = []
        self.receive_calls = 0
        self.exception: Exception | None = None
        self.finished = False
        self.cancelled_app = False
        self._on_send = on_send
        self._clear_state = clear_state_before_shutdown
        self._shutdown = anyio.Event()
        self._progress = anyio.Event()

    def _moved(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()

    def types(self) -> list[str]:
        return [m["type"] for m in self.sent]

    async def receive(self) -> Message:
        self.receive_calls += 1
        if self.receive_calls == 1:
            return {"type": "lifespan.startup"}
        await self._shutdown.wait()
        if self.receive_calls == 2:
            return {"type": "lifespan.shutdown"}
        raise AssertionError("the app read a third lifespan message")

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        self._moved()
        if self._on_send is not None:
            result = self._on_send(message)
            if result is not None:
                await result

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        with anyio.fail_after(10):
            while not predicate():
                await self._progress.wait()

    async def _run(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except Exception as exc:
            self.exception = exc
        finally:
            self.finished = True
            self._moved()

    async def serve(self, while_up: Callable[[], Awaitable[None]] | None = None) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._run)
            await self._wait_for(
                lambda: self.finished or any(t in _STARTUP_ANSWERS for t in self.types())
            )
            if "lifespan.startup.complete" in self.types():
                if while_up is not None:
                    await while_up()
                if self._clear_state:
                    self.state.clear()
                self._shutdown.set()
                await self._wait_for(lambda: self.finished)
            elif not self.finished:
                # uvicorn exits after a failed startup without sending shutdown.
                self.cancelled_app = True
                tg.cancel_scope.cancel()


# --- databases and apps ---------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'lifespan.db'}"


def unanswered_url(driver: str = "asyncpg") -> str:
    """A PostgreSQL URL, password included, on a loopback port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"postgresql+{driver}://u:{PASSWORD}@127.0.0.1:{port}/x"


async def prepare(url: str) -> None:
    """Create the tables with an engine of their own: the ``Database`` must stay unstarted."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
    finally:
        await engine.dispose()


async def committed(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return set((await connection.execute(select(items.c.key))).scalars())
    finally:
        await engine.dispose()


def pool_of(db: Database) -> QueuePool:
    assert started_engine(db) is not None, f"{db!r} has no engine"
    pool = db.engine.sync_engine.pool
    assert isinstance(pool, QueuePool), pool  # file SQLite and PostgreSQL alike
    return pool


async def lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
    """An app that implements lifespan by the book and answers HTTP with a 204."""
    if scope["type"] == "http":
        await plain_response(send, 204)
        return
    assert (await receive())["type"] == "lifespan.startup"
    await send(STARTUP_COMPLETE)
    assert (await receive())["type"] == "lifespan.shutdown"
    await send(SHUTDOWN_COMPLETE)


def writer_app(db: Database, key: str) -> ASGIApp:
    """HTTP only (raises on any other scope): writes ``key`` and answers 200."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        await db.session.execute(insert(items).values(key=key))
        await plain_response(send, 200)

    return app


async def disposed(*databases: Database) -> None:
    for db in databases:
        await db.dispose()


# --- engines follow the lifespan ------------------------------------------------------


async def test_the_engine_is_created_at_startup_and_disposed_before_shutdown_complete(
    database_url: str,
) -> None:
    db = Database(database_url)
    assert started_engine(db) is None
    pools: list[QueuePool] = []
    observed: list[tuple[str, Any]] = []

    async def on_send(message: Message) -> None:
        if message["type"] == "lifespan.startup.complete":
            pools.append(pool_of(db))
            # The database answered: the startup check's connection is in the pool.
            observed.append(("startup", (pools[0].checkedin(), pools[0].checkedout())))
        elif message["type"] == "lifespan.shutdown.complete":
            observed.append(("shutdown", (started_engine(db), pools[0].checkedin())))

    async def while_up() -> None:
        recorder = await call_http(SQLAlchemyMiddleware(lifespan_app, db))
        assert recorder.status == 204
        assert pool_of(db) is pools[0]  # the request used the engine made at startup

    server = LifespanServer(SQLAlchemyMiddleware(lifespan_app, db), on_send=on_send)
    await server.serve(while_up)

    assert server.sent == [STARTUP_COMPLETE, SHUTDOWN_COMPLETE]
    assert server.exception is None
    assert observed == [("startup", (1, 0)), ("shutdown", (None, 0))]
    assert started_engine(db) is None


async def test_several_databases_start_together_and_are_disposed_together(
    tmp_path: Path,
) -> None:
    first = Database(f"sqlite+aiosqlite:///{tmp_path / 'first.db'}")
    second = Database(f"sqlite+aiosqlite:///{tmp_path / 'second.db'}")
    observed: list[tuple[str, bool, bool]] = []

    def on_send(message: Message) -> None:
        observed.append(
            (message["type"], started_engine(first) is None, started_engine(second) is None)
        )

    server = LifespanServer(SQLAlchemyMiddleware(lifespan_app, first, second), on_send=on_send)
    await server.serve()

    assert observed == [
        ("lifespan.startup.complete", False, False),
        ("lifespan.shutdown.complete", True, True),
    ]
    assert server.exception is None


async def test_the_databases_are_published_in_the_lifespan_state(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    seen_by_app: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        seen_by_app.append(scope["state"].get(STATE_KEY))
        await send(STARTUP_COMPLETE)
        await receive()
        await send(SHUTDOWN_COMPLETE)

    published: list[Any] = []

    async def while_up() -> None:
        published.append(server.state.get(STATE_KEY))

    server = LifespanServer(SQLAlchemyMiddleware(app, db))
    await server.serve(while_up)

    assert seen_by_app == [(db,)]
    assert published == [(db,)]
    assert server.sent == [STARTUP_COMPLETE, SHUTDOWN_COMPLETE]


async def test_the_inner_apps_lifespan_runs_inside_and_its_writes_are_committed(
    database_url: str,
) -> None:
    await prepare(database_url)
    db = Database(database_url)
    engine_up: list[tuple[str, bool]] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine_up.append(("startup", started_engine(db) is not None))
        async with db.scope():
            await db.session.execute(insert(items).values(key="at startup"))
        yield
        async with db.scope():
            await db.session.execute(insert(items).values(key="at shutdown"))
        engine_up.append(("shutdown", started_engine(db) is not None))

    while_up_keys: list[set[str]] = []

    async def while_up() -> None:
        while_up_keys.append(await committed(database_url))

    disposed_at_complete: list[bool] = []

    def on_send(message: Message) -> None:
        if message["type"] == "lifespan.shutdown.complete":
            disposed_at_complete.append(started_engine(db) is None)

    server = LifespanServer(SQLAlchemyMiddleware(Starlette(lifespan=lifespan), db), on_send=on_send)
    await server.serve(while_up)

    assert server.types() == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert server.exception is None
    assert engine_up == [("startup", True), ("shutdown", True)]
    assert while_up_keys == [{"at startup"}]
    assert disposed_at_complete == [True]
    assert await committed(database_url) == {"at startup", "at shutdown"}


# --- inner apps that do not follow the protocol ---------------------------------------


async def _returns_at_once(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await plain_response(send, 204)


async def _http_only(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    await plain_response(send, 204)


@pytest.mark.parametrize("app", [_http_only, _returns_at_once], ids=["raises", "returns"])
async def test_an_app_without_lifespan_support_still_gets_its_engines_managed(
    sqlite_url: str, app: ASGIApp
) -> None:
    db = Database(sqlite_url)
    observed: list[tuple[str, bool]] = []

    def on_send(message: Message) -> None:
        observed.append((message["type"], started_engine(db) is None))

    async def while_up() -> None:
        recorder = await call_http(SQLAlchemyMiddleware(app, db))
        assert recorder.status == 204
        assert pool_of(db).checkedin() == 1  # still the connection checked at startup

    server = LifespanServer(SQLAlchemyMiddleware(app, db), on_send=on_send)
    await server.serve(while_up)

    assert observed == [
        ("lifespan.startup.complete", False),
        ("lifespan.shutdown.complete", True),
    ]
    assert server.exception is None


async def test_an_app_raising_after_reading_startup_fails_startup_and_the_error_propagates(
    sqlite_url: str,
) -> None:
    db = Database(sqlite_url)
    error = Boom("no configuration")
    disposed_at_failed: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise error

    def on_send(message: Message) -> None:
        disposed_at_failed.append(started_engine(db) is None)

    server = LifespanServer(SQLAlchemyMiddleware(app, db), on_send=on_send)
    await server.serve()

    assert server.types() == ["lifespan.startup.failed"]
    assert server.sent[0]["message"] == "Boom: no configuration"
    assert disposed_at_failed == [True]
    assert server.exception is error


async def test_an_app_raising_after_startup_complete_disposes_the_engines_and_reraises(
    sqlite_url: str,
) -> None:
    db = Database(sqlite_url)
    error = Boom("after startup")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(STARTUP_COMPLETE)
        raise error

    server = LifespanServer(SQLAlchemyMiddleware(app, db))
    await server.serve()

    assert server.sent == [STARTUP_COMPLETE]
    assert server.exception is error
    assert started_engine(db) is None


async def test_an_app_returning_right_after_startup_complete_keeps_its_engines_until_shutdown(
    sqlite_url: str,
) -> None:
    db = Database(sqlite_url)
    observed: list[tuple[str, bool]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(STARTUP_COMPLETE)

    def on_send(message: Message) -> None:
        observed.append((message["type"], started_engine(db) is None))

    async def while_up() -> None:
        observed.append(("while up", started_engine(db) is None))

    server = LifespanServer(SQLAlchemyMiddleware(app, db), on_send=on_send)
    await server.serve(while_up)

    assert observed == [
        ("lifespan.startup.complete", False),
        ("while up", False),
        ("lifespan.shutdown.complete", True),
    ]
    assert server.exception is None


async def test_an_app_raising_during_shutdown_gets_shutdown_failed_sent_once(
    sqlite_url: str,
) -> None:
    db = Database(sqlite_url)
    error = Boom("cannot stop")
    disposed_at_failed: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(STARTUP_COMPLETE)
        await receive()
        raise error

    def on_send(message: Message) -> None:
        if message["type"] == "lifespan.shutdown.failed":
            disposed_at_failed.append(started_engine(db) is None)

    server = LifespanServer(SQLAlchemyMiddleware(app, db), on_send=on_send)
    await server.serve()

    assert server.sent == [
        STARTUP_COMPLETE,
        {"type": "lifespan.shutdown.failed", "message": "Boom: cannot stop"},
    ]
    assert disposed_at_failed == [True]
    assert server.exception is error


async def test_an_app_that_reports_startup_failed_and_keeps_waiting_gets_the_engines_disposed(
    sqlite_url: str,
) -> None:
    """Quart's way: send ``startup.failed``, then go on reading messages."""
    db = Database(sqlite_url)
    failed = {"type": "lifespan.startup.failed", "message": "the app says no"}
    disposed_at_failed: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(failed)
        while True:
            await receive()

    def on_send(message: Message) -> None:
        disposed_at_failed.append(started_engine(db) is None)

    server = LifespanServer(SQLAlchemyMiddleware(app, db), on_send=on_send)
    await server.serve()

    assert server.sent == [failed]
    assert disposed_at_failed == [True]
    assert server.cancelled_app
    assert server.exception is None
    assert started_engine(db) is None


async def test_a_starlette_lifespan_that_raises_at_startup_reaches_the_server_once(
    sqlite_url: str,
) -> None:
    db = Database(sqlite_url)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise Boom("cannot start")
        yield  # pragma: no cover

    disposed_at_failed: list[bool] = []

    def on_send(message: Message) -> None:
        disposed_at_failed.append(started_engine(db) is None)

    server = LifespanServer(SQLAlchemyMiddleware(Starlette(lifespan=lifespan), db), on_send=on_send)
    await server.serve()

    assert server.types() == ["lifespan.startup.failed"]
    assert "cannot start" in server.sent[0]["message"]
    assert disposed_at_failed == [True]
    assert isinstance(server.exception, Boom)


async def test_a_starlette_lifespan_that_raises_at_shutdown_reaches_the_server_once(
    sqlite_url: str,
) -> None:
    db = Database(sqlite_url)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        raise Boom("cannot stop")

    disposed_at_failed: list[bool] = []

    def on_send(message: Message) -> None:
        if message["type"] == "lifespan.shutdown.failed":
            disposed_at_failed.append(started_engine(db) is None)

    server = LifespanServer(SQLAlchemyMiddleware(Starlette(lifespan=lifespan), db), on_send=on_send)
    await server.serve()

    assert server.types() == ["lifespan.startup.complete", "lifespan.shutdown.failed"]
    assert "cannot stop" in server.sent[1]["message"]
    assert disposed_at_failed == [True]
    assert isinstance(server.exception, Boom)


async def test_a_server_that_clears_the_state_before_shutdown_still_gets_the_engines_disposed(
    sqlite_url: str,
) -> None:
    db = Database(sqlite_url)
    disposed_at_complete: list[bool] = []

    def on_send(message: Message) -> None:
        if message["type"] == "lifespan.shutdown.complete":
            disposed_at_complete.append(started_engine(db) is None)

    server = LifespanServer(
        SQLAlchemyMiddleware(lifespan_app, db), on_send=on_send, clear_state_before_shutdown=True
    )
    await server.serve()

    assert server.sent == [STARTUP_COMPLETE, SHUTDOWN_COMPLETE]
    assert server.state == {}
    assert disposed_at_complete == [True]


async def test_a_server_without_lifespan_state_still_gets_the_engines_managed(
    sqlite_url: str,
) -> None:
    db = Database(sqlite_url)
    observed: list[tuple[str, bool]] = []

    def on_send(message: Message) -> None:
        observed.append((message["type"], started_engine(db) is None))

    server = LifespanServer(
        SQLAlchemyMiddleware(lifespan_app, db), on_send=on_send, with_state=False
    )
    await server.serve()

    assert "state" not in server.scope
    assert observed == [
        ("lifespan.startup.complete", False),
        ("lifespan.shutdown.complete", True),
    ]
    assert server.exception is None


@pytest.mark.parametrize("who_fails", ["app", "database"])
async def test_a_send_that_raises_on_startup_failed_propagates_and_the_engines_are_disposed(
    sqlite_url: str, who_fails: str
) -> None:
    """hypercorn's send() raises ``LifespanFailureError`` when it gets ``startup.failed``."""
    good = Database(sqlite_url)
    databases = [good] if who_fails == "app" else [good, Database(unanswered_url())]
    disposed_at_failed: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "the app says no"})

    def on_send(message: Message) -> None:
        if message["type"] == "lifespan.startup.failed":
            disposed_at_failed.append(started_engine(good) is None)
            raise LifespanFailureError(message["message"])

    server = LifespanServer(SQLAlchemyMiddleware(app, *databases), on_send=on_send)
    try:
        await server.serve()
    finally:
        await disposed(*databases)

    assert server.types() == ["lifespan.startup.failed"]
    assert isinstance(server.exception, LifespanFailureError)
    assert disposed_at_failed == [True]
    assert started_engine(good) is None


# --- a database that does not answer --------------------------------------------------


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_database_that_does_not_answer_fails_startup_without_showing_its_password(
    sqlite_url: str, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = Database(sqlite_url)
    url = unanswered_url(driver)
    bad = Database(url)
    startup_ran: list[bool] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        startup_ran.append(True)
        yield

    disposed_at_failed: list[bool] = []

    def on_send(message: Message) -> None:
        disposed_at_failed.append(started_engine(good) is None)

    caplog.set_level(logging.DEBUG, logger="asgi_sqla")
    server = LifespanServer(
        SQLAlchemyMiddleware(Starlette(lifespan=lifespan), good, bad), on_send=on_send
    )
    try:
        await server.serve()
    finally:
        await disposed(good, bad)

    assert server.types() == ["lifespan.startup.failed"]
    message = server.sent[0]["message"]
    assert repr(bad) in message
    assert url.replace(PASSWORD, "***") in message
    assert "did not answer" in message
    assert PASSWORD not in message
    assert disposed_at_failed == [True]  # the database that had started is disposed
    assert startup_ran == []
    assert isinstance(server.exception, DatabaseStartupError)
    assert PASSWORD not in str(server.exception)
    assert caplog.records
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)
    assert all(PASSWORD not in (r.exc_text or "") for r in caplog.records)


async def test_a_database_that_does_not_answer_is_reported_once_in_startup_failed_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Servers show lifespan.startup.failed's message (uvicorn logs it at ERROR): an ERROR
    # record of the same failure made every server print it twice.
    bad = Database(unanswered_url())
    caplog.set_level(logging.DEBUG, logger="asgi_sqla")
    server = LifespanServer(SQLAlchemyMiddleware(Starlette(), bad))
    try:
        await server.serve()
    finally:
        await disposed(bad)

    assert server.types() == ["lifespan.startup.failed"]
    assert "did not answer" in server.sent[0]["message"]
    shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [m for m in shown if "did not answer" in m], shown


async def test_an_app_that_reports_the_database_failure_itself_does_not_double_the_answer(
    sqlite_url: str,
) -> None:
    bad = Database(unanswered_url())
    seen: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await receive()
        except DatabaseStartupError as exc:
            seen.append(exc)
            await send({"type": "lifespan.startup.failed", "message": str(exc)})

    server = LifespanServer(SQLAlchemyMiddleware(app, bad))
    try:
        await server.serve()
    finally:
        await disposed(bad)

    assert server.types() == ["lifespan.startup.failed"]
    assert len(seen) == 1
    assert server.exception is None


# --- no lifespan at all ---------------------------------------------------------------


async def test_without_lifespan_the_first_request_creates_the_engine(sqlite_url: str) -> None:
    await prepare(sqlite_url)
    db = Database(sqlite_url)
    assert started_engine(db) is None
    try:
        recorder = await call_http(SQLAlchemyMiddleware(writer_app(db, "lazy"), db))
        assert recorder.status == 200
        assert started_engine(db) is not None
        assert pool_of(db).checkedout() == 0
    finally:
        await db.dispose()
    assert await committed(sqlite_url) == {"lazy"}


# --- trio -----------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_startup_fails_with_a_message_about_asyncio(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    server = LifespanServer(SQLAlchemyMiddleware(lifespan_app, db))
    await server.serve()

    assert server.types() == ["lifespan.startup.failed"]
    message = server.sent[0]["message"]
    assert "asyncio" in message
    assert "trio" in message
    # The app's own error is the same explanation, raised from its receive().
    assert isinstance(server.exception, AsgiSqlaError)
    assert str(server.exception) == message
    assert started_engine(db) is None  # refused before any engine was made
