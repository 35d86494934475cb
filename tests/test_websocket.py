"""Websockets: a lazy session, one transaction per message, nothing held while idle.

The server side is a hand-written driver (``WebSocketServer``) that the test steps
message by message; the moments it observes are the app entering ``receive()`` and
each message reaching the server.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from httpx_ws import AsyncWebSocketSession, aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport
from psycopg.rows import TupleRow
from sqlalchemy import Column, Integer, MetaData, String, Table, UniqueConstraint, insert, select
from sqlalchemy.exc import IntegrityError
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from asgi_sqla import (
    SCOPE_KEY,
    CommitFailedError,
    Database,
    SessionContext,
    SessionEndedError,
    SQLAlchemyMiddleware,
)
from asgi_sqla.types import ASGIApp, Message, Receive, Scope, Send

from _helpers import checked_out, create_tables, items, keys, started_engine, websocket_scope

pytestmark = pytest.mark.anyio

ACCEPT: Message = {"type": "websocket.accept"}
CONNECT: Message = {"type": "websocket.connect"}
DISCONNECT: Message = {"type": "websocket.disconnect", "code": 1000}

#: A unique constraint checked only at COMMIT (PostgreSQL): two equal keys in one
#: transaction insert fine and then fail to commit.
deferred_metadata = MetaData()
deferred = Table(
    "deferred_keys",
    deferred_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(64), nullable=False),
    UniqueConstraint("key", deferrable=True, initially="DEFERRED"),
)


class Boom(Exception):
    """Raised by the test apps."""


def text(value: str) -> Message:
    return {"type": "websocket.receive", "text": value}


class WebSocketServer:
    """The server side of one websocket, stepped by the test.

    ``push()`` queues client messages; the app's ``receive()`` blocks until one is
    queued.  ``wait_for(predicate)`` waits (bounded) until the app has made enough
    progress, e.g. ``lambda: server.receive_calls == 3`` means the app is now waiting
    in its third ``receive()`` (after the middleware's commit).  ``on_send`` runs as
    each message reaches the server, before it is recorded.
    """

    def __init__(
        self,
        app: ASGIApp,
        scope: Scope | None = None,
        on_send: Callable[[Message], Awaitable[None]] | None = None,
    ) -> None:
        self.app = app
        self.scope = scope if scope is not None else websocket_scope()
        self.sent: list[Message] = []
        self.receive_calls = 0
        self.exception: BaseException | None = None
        self.finished = False
        self._on_send = on_send
        self._inbox_in, self._inbox_out = anyio.create_memory_object_stream[Message](math.inf)
        self._progress = anyio.Event()

    def _moved(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()

    async def receive(self) -> Message:
        self.receive_calls += 1
        self._moved()
        return await self._inbox_out.receive()

    async def send(self, message: Message) -> None:
        if self._on_send is not None:
            await self._on_send(message)
        self.sent.append(message)
        self._moved()

    def push(self, *messages: Message) -> None:
        for message in messages:
            self._inbox_in.send_nowait(message)

    def types(self) -> list[str]:
        return [m["type"] for m in self.sent]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        with anyio.fail_after(10):
            while not predicate():
                if self.finished:
                    raise AssertionError(f"the app finished early: {self.exception!r}")
                await self._progress.wait()

    async def waiting_in_receive(self, calls: int) -> None:
        """Wait until the app is blocked in its ``calls``-th ``receive()``."""
        await self.wait_for(lambda: self.receive_calls >= calls)

    async def call(self) -> None:
        """Run the app to its end in this task (exceptions propagate)."""
        try:
            with anyio.fail_after(10):
                await self.app(self.scope, self.receive, self.send)
        finally:
            self._close()

    def _close(self) -> None:
        self._inbox_in.close()
        self._inbox_out.close()

    async def _run(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except Exception as exc:
            self.exception = exc
        finally:
            self.finished = True
            self._moved()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[WebSocketServer]:
        """Run the app in a task while the block steps it; wait for its end at exit."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._run)
                yield self
                await self.wait_for(lambda: self.finished)
        finally:
            self._close()


@pytest.fixture
async def pg_db(postgresql_url: str) -> AsyncIterator[Database]:
    database = Database(postgresql_url)
    await create_tables(database)
    async with database.engine.begin() as connection:
        await connection.run_sync(deferred_metadata.create_all)
    yield database
    await database.dispose()


async def write(db: Database, key: str) -> None:
    await db.session.execute(insert(items).values(key=key))


async def write_uncommittable(db: Database) -> None:
    """Two equal keys: fine until COMMIT, where the deferred constraint fails."""
    await db.session.execute(insert(deferred).values(key="twice"))
    await db.session.execute(insert(deferred).values(key="twice"))


async def committed_deferred(db: Database) -> int:
    async with db.engine.connect() as connection:
        return len((await connection.execute(select(deferred.c.id))).all())


def idle_in_transaction(pg_admin: psycopg.Connection[TupleRow]) -> int:
    row = pg_admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
    ).fetchone()
    assert row is not None
    return int(row[0])


def app_backends(pg_admin: psycopg.Connection[TupleRow]) -> int:
    row = pg_admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    ).fetchone()
    assert row is not None
    return int(row[0])


# --- laziness -------------------------------------------------------------------------


async def test_a_websocket_that_never_reads_db_session_opens_nothing(database_url: str) -> None:
    db = Database(database_url)
    seen_contexts: list[SessionContext] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen_contexts.append(SessionContext.from_scope(scope))
        assert (await receive())["type"] == "websocket.connect"
        await send(ACCEPT)
        message = await receive()
        await send({"type": "websocket.send", "text": message["text"].upper()})
        assert (await receive())["type"] == "websocket.disconnect"

    async def on_send(message: Message) -> None:
        assert not seen_contexts[0].has_sessions
        assert started_engine(db) is None

    server = WebSocketServer(SQLAlchemyMiddleware(app, db), on_send=on_send)
    server.push(CONNECT, text("hi"), DISCONNECT)
    await server.call()

    assert server.sent == [ACCEPT, {"type": "websocket.send", "text": "HI"}]
    assert server.scope[SCOPE_KEY] is seen_contexts[0]
    assert not seen_contexts[0].has_sessions
    assert seen_contexts[0].ended
    # Not even an engine was created, so certainly no connection was checked out.
    assert started_engine(db) is None


# --- one transaction per message ------------------------------------------------------


async def test_each_message_is_committed_and_released_while_the_app_waits_for_the_next(
    db: Database,
) -> None:
    sessions: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(ACCEPT)
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            sessions.append(db.session)
            await write(db, message["text"])
            if message["text"] == "boom":
                raise Boom

    server = WebSocketServer(SQLAlchemyMiddleware(app, db))
    async with server.running():
        server.push(CONNECT)
        await server.waiting_in_receive(2)
        assert checked_out(db) == 0
        assert await keys(db) == set()

        server.push(text("m1"))
        await server.waiting_in_receive(3)
        # The app is blocked in receive(): m1 is committed, its connection returned.
        assert checked_out(db) == 0
        assert await keys(db) == {"m1"}

        server.push(text("m2"))
        await server.waiting_in_receive(4)
        assert checked_out(db) == 0
        assert await keys(db) == {"m1", "m2"}

        # The third message's work is its own transaction: its rollback keeps m1, m2.
        server.push(text("boom"))

    assert isinstance(server.exception, Boom)
    assert server.sent == [ACCEPT]
    assert await keys(db) == {"m1", "m2"}
    assert checked_out(db) == 0
    assert len(sessions) == 3
    assert len({id(s) for s in sessions}) == 3


async def test_no_backend_is_idle_in_transaction_while_the_app_waits(
    pg_db: Database, pg_admin: psycopg.Connection[TupleRow]
) -> None:
    db = pg_db

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(ACCEPT)
        while (message := await receive())["type"] == "websocket.receive":
            await write(db, message["text"])

    server = WebSocketServer(SQLAlchemyMiddleware(app, db))
    async with server.running():
        server.push(CONNECT, text("m1"))
        await server.waiting_in_receive(3)
        assert checked_out(db) == 0
        assert idle_in_transaction(pg_admin) == 0
        # The row is visible from a connection that is not the app's.
        assert pg_admin.execute("SELECT key FROM items").fetchall() == [("m1",)]
        # The app's backend is still connected (pooled), just not in a transaction.
        assert app_backends(pg_admin) >= 1

        server.push(text("m2"))
        await server.waiting_in_receive(4)
        assert checked_out(db) == 0
        assert idle_in_transaction(pg_admin) == 0
        assert sorted(pg_admin.execute("SELECT key FROM items").fetchall()) == [("m1",), ("m2",)]
        server.push(DISCONNECT)

    assert server.exception is None
    assert checked_out(db) == 0


# --- the end of the conversation ------------------------------------------------------


async def test_a_close_after_accept_commits_before_the_server_gets_it(db: Database) -> None:
    at_close: list[tuple[int, set[str]]] = []
    close = {"type": "websocket.close", "code": 1000, "reason": "bye"}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(ACCEPT)
        await write(db, "closing")
        await send(close)

    async def on_send(message: Message) -> None:
        if message["type"] == "websocket.close":
            at_close.append((checked_out(db), await keys(db)))

    server = WebSocketServer(SQLAlchemyMiddleware(app, db), on_send=on_send)
    server.push(CONNECT)
    await server.call()

    assert server.sent == [ACCEPT, close]
    assert at_close == [(0, {"closing"})]
    assert checked_out(db) == 0


async def test_a_close_before_accept_is_decided_like_the_403_denial_it_becomes(
    database_url: str,
) -> None:
    """The ASGI spec: a close before accept makes the server answer HTTP 403.

    The client sees the same 403 as with ``websocket.http.response.start`` status 403,
    so the transaction ends the same way: by ``commit_on(403)``.
    """
    asked: list[int] = []

    def commit_on(status: int) -> bool:
        asked.append(status)
        return status < 400

    db = Database(database_url, commit_on=commit_on)
    await create_tables(db)
    at_close: list[tuple[int, set[str]]] = []
    close = {"type": "websocket.close", "code": 1000, "reason": "go away"}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await write(db, "denied by close")
        await send(close)

    async def on_send(message: Message) -> None:
        at_close.append((checked_out(db), await keys(db)))

    server = WebSocketServer(SQLAlchemyMiddleware(app, db), on_send=on_send)
    server.push(CONNECT)
    try:
        await server.call()
        assert server.sent == [close]
        assert asked == [403]
        assert at_close == [(0, set())]
        assert checked_out(db) == 0
    finally:
        await db.dispose()


async def test_an_app_that_returns_without_closing_commits(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(ACCEPT)
        await write(db, "returned")

    server = WebSocketServer(SQLAlchemyMiddleware(app, db))
    server.push(CONNECT)
    await server.call()

    assert server.sent == [ACCEPT]
    assert await keys(db) == {"returned"}
    assert checked_out(db) == 0


async def test_an_exception_rolls_back_and_propagates_unchanged(db: Database) -> None:
    error = Boom("raised by the app")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(ACCEPT)
        await write(db, "doomed")
        raise error

    server = WebSocketServer(SQLAlchemyMiddleware(app, db))
    server.push(CONNECT)
    with pytest.raises(Boom) as raised:
        await server.call()

    assert raised.value is error
    assert server.sent == [ACCEPT]
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_work_after_the_client_disconnected_commits_when_the_app_returns(
    db: Database,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(ACCEPT)
        await write(db, "before")
        assert (await receive())["type"] == "websocket.disconnect"
        await write(db, "after")

    server = WebSocketServer(SQLAlchemyMiddleware(app, db))
    async with server.running():
        server.push(CONNECT)
        await server.waiting_in_receive(2)
        assert await keys(db) == {"before"}
        server.push(DISCONNECT)

    assert server.exception is None
    assert server.sent == [ACCEPT]
    assert await keys(db) == {"before", "after"}
    assert checked_out(db) == 0


# --- the denial response extension ----------------------------------------------------


@pytest.mark.parametrize(("status", "commits"), [(403, False), (200, True), (201, True)])
async def test_a_denial_response_commits_or_rolls_back_by_its_status(
    db: Database, status: int, commits: bool
) -> None:
    at_start: list[tuple[int, set[str]]] = []
    start = {"type": "websocket.http.response.start", "status": status, "headers": []}
    body = {"type": "websocket.http.response.body", "body": b"denied", "more_body": False}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await write(db, "denial")
        await send(start)
        await send(body)

    async def on_send(message: Message) -> None:
        if message["type"] == "websocket.http.response.start":
            at_start.append((checked_out(db), await keys(db)))

    scope = websocket_scope(extensions={"websocket.http.response": {}})
    server = WebSocketServer(SQLAlchemyMiddleware(app, db), scope=scope, on_send=on_send)
    server.push(CONNECT)
    await server.call()

    assert server.sent == [start, body]
    expected = {"denial"} if commits else set()
    assert at_start == [(0, expected)]
    assert await keys(db) == expected
    assert checked_out(db) == 0


# --- failed commits -------------------------------------------------------------------


def error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "asgi_sqla" and r.levelno == logging.ERROR]


async def test_a_failed_commit_while_waiting_closes_1011_and_raises_into_receive(
    pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    db = pg_db
    raised: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(ACCEPT)
        await receive()
        await write_uncommittable(db)
        try:
            await receive()
        except CommitFailedError as exc:
            raised.append(exc)
        try:
            await send({"type": "websocket.send", "text": "as if nothing happened"})
        except CommitFailedError as exc:
            raised.append(exc)
        try:
            await receive()
        except CommitFailedError as exc:
            raised.append(exc)
            raise

    server = WebSocketServer(SQLAlchemyMiddleware(app, db))
    server.push(CONNECT, text("m1"), text("m2"))
    await server.call()

    assert server.sent == [ACCEPT, {"type": "websocket.close", "code": 1011, "reason": ""}]
    # The app's receive() raised before the server was asked for m2.
    assert server.receive_calls == 2
    assert [type(e) for e in raised] == [CommitFailedError] * 3
    assert isinstance(raised[0].__cause__, IntegrityError)
    [record] = error_records(caplog)
    assert record.exc_info is not None
    assert "1011" in record.getMessage()
    assert checked_out(db) == 0
    assert await committed_deferred(db) == 0


async def test_a_failed_commit_at_close_sends_1011_instead_of_the_apps_close(
    pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    db = pg_db
    raised: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(ACCEPT)
        await write_uncommittable(db)
        try:
            await send({"type": "websocket.close", "code": 1000, "reason": "done"})
        except CommitFailedError as exc:
            raised.append(exc)
            raise

    server = WebSocketServer(SQLAlchemyMiddleware(app, db))
    server.push(CONNECT)
    await server.call()

    assert server.sent == [ACCEPT, {"type": "websocket.close", "code": 1011, "reason": ""}]
    assert len(raised) == 1
    assert isinstance(raised[0].__cause__, IntegrityError)
    assert len(error_records(caplog)) == 1
    assert checked_out(db) == 0
    assert await committed_deferred(db) == 0


async def test_a_failed_commit_at_a_denial_sends_a_500_denial_instead(
    pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    db = pg_db
    raised: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await write_uncommittable(db)
        try:
            await send({"type": "websocket.http.response.start", "status": 200, "headers": []})
        except CommitFailedError as exc:
            raised.append(exc)
        try:
            await send({"type": "websocket.http.response.body", "body": b"ok"})
        except CommitFailedError as exc:
            raised.append(exc)

    scope = websocket_scope(extensions={"websocket.http.response": {}})
    server = WebSocketServer(SQLAlchemyMiddleware(app, db), scope=scope)
    server.push(CONNECT)
    await server.call()

    assert server.types() == ["websocket.http.response.start", "websocket.http.response.body"]
    assert server.sent[0]["status"] == 500
    assert server.sent[1]["body"] == b"Internal Server Error"
    assert not server.sent[1].get("more_body", False)
    assert [type(e) for e in raised] == [CommitFailedError] * 2
    assert len(error_records(caplog)) == 1
    assert checked_out(db) == 0
    assert await committed_deferred(db) == 0


# --- stale references -----------------------------------------------------------------


async def test_a_session_kept_across_receive_raises_session_ended_error(db: Database) -> None:
    outcome: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(ACCEPT)
        stale = db.session
        await stale.execute(insert(items).values(key="first"))
        await receive()
        try:
            await stale.execute(insert(items).values(key="through the stale session"))
        except SessionEndedError as exc:
            outcome.append(exc)
        fresh = db.session
        outcome.append(fresh is not stale)
        await fresh.execute(insert(items).values(key="second"))

    server = WebSocketServer(SQLAlchemyMiddleware(app, db))
    server.push(CONNECT, text("next"))
    await server.call()

    error, is_new = outcome
    assert isinstance(error, SessionEndedError)
    assert "receive()" in str(error)
    assert is_new is True
    assert await keys(db) == {"first", "second"}
    assert checked_out(db) == 0


# --- through a framework --------------------------------------------------------------


async def test_a_starlette_websocket_route_commits_each_message_before_reading_the_next(
    db: Database,
) -> None:
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                key = await websocket.receive_text()
                await write(db, key)
                await websocket.send_text(f"wrote {key}")
        except WebSocketDisconnect:
            pass

    app = SQLAlchemyMiddleware(Starlette(routes=[WebSocketRoute("/ws", endpoint)]), db)
    transport = ASGIWebSocketTransport(app)
    client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
    with anyio.fail_after(10):
        # Leaving the client waits for the app: the transport runs it in its task group.
        ws: AsyncWebSocketSession
        async with client, aconnect_ws("/ws", client) as ws:
            await ws.send_text("a")
            assert await ws.receive_text() == "wrote a"
            await ws.send_text("b")
            assert await ws.receive_text() == "wrote b"
            # The endpoint read "b", so its receive() committed "a" first.
            assert "a" in await keys(db)

    assert await keys(db) == {"a", "b"}
    assert checked_out(db) == 0
