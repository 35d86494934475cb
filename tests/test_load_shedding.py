"""Load shedding (``admission_limit``) and the saturation warning (``warn_pool_saturated_for``).

A request past its database's ``admission_limit`` waits up to ``admission_timeout``
and is then answered 503 with Retry-After, instead of queueing in the pool; a request
that does not use the database is never counted.  Each test holds places with a
request that waits on an event after its first statement, so who is admitted is
decided by the test, not by timing.  The pools are larger than the limits: a refusal
here comes from the limit, never from the pool.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_sqla import (
    ConfigurationError,
    Database,
    DatabaseBusyError,
    SQLAlchemyMiddleware,
    SyncDatabase,
)
from asgi_sqla.types import ASGIApp, Message, Receive, Scope, Send

from _helpers import (
    ASGIRecorder,
    call_http,
    checked_out,
    http_scope,
    items,
    open_database,
    open_sync_database,
    plain_response,
    sync_checked_out,
    websocket_scope,
)

pytestmark = pytest.mark.anyio

#: Larger than any limit below, with a pool timeout no test reaches.
POOL = {"pool_size": 8, "max_overflow": 0, "pool_timeout": 10}


@asynccontextmanager
async def opened(url: str, **options: Any) -> AsyncIterator[Database]:
    db = await open_database(url, **{**POOL, **options})
    try:
        yield db
    finally:
        await db.dispose()


@pytest.fixture
def sync_opened(sync_database_url: str) -> Iterator[Callable[..., SyncDatabase]]:
    made: list[SyncDatabase] = []

    def make(**options: Any) -> SyncDatabase:
        made.append(open_sync_database(sync_database_url, **{**POOL, **options}))
        return made[-1]

    yield make
    for db in made:
        db.dispose()


def retry_after(recorder: ASGIRecorder) -> list[bytes]:
    start = next(m for m in recorder.sent if m["type"] == "http.response.start")
    return [v for k, v in start["headers"] if k.lower() == b"retry-after"]


class Holder:
    """A request that holds its place (and connection) until :meth:`release`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.holding = anyio.Event()
        self._release = anyio.Event()
        #: Set just before the holder's response starts, where it gives its place back.
        self.giving_back = False

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.db.session.execute(text("SELECT 1"))
        self.holding.set()
        await self._release.wait()
        self.giving_back = True
        await plain_response(send, 200)

    def release(self) -> None:
        self._release.set()


@asynccontextmanager
async def held(db: Database, **middleware: Any) -> AsyncIterator[Holder]:
    """A request holding one of ``db``'s places for the block; it ends after the block."""
    holder = Holder(db)
    async with anyio.create_task_group() as group:
        group.start_soon(call_http, SQLAlchemyMiddleware(holder.app, db, **middleware))
        await holder.holding.wait()
        try:
            yield holder
        finally:
            holder.release()


def query_app(db: Database, status: int = 200) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.session.execute(text("SELECT 2"))
        await plain_response(send, status)

    return app


async def test_past_the_limit_a_request_is_answered_503_with_retry_after_at_once(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(database_url, admission_limit=1) as db:
        app = SQLAlchemyMiddleware(query_app(db), db, retry_after=3)
        with caplog.at_level(logging.WARNING, logger="asgi_sqla"):
            async with held(db):
                started = time.monotonic()
                recorder = await call_http(app)
                elapsed = time.monotonic() - started

        assert recorder.status == 503
        assert retry_after(recorder) == [b"3"]
        assert b"Retry shortly" in recorder.body
        assert elapsed < 1.0  # the pool's timeout is 10 s: the refusal did not queue
        assert any("admission_limit" in r.getMessage() for r in caplog.records)
        assert checked_out(db) == 0
        # The place is free again: the same request now passes.
        assert (await call_http(app)).status == 200


async def test_the_refusal_names_the_limit_and_the_fix(database_url: str) -> None:
    async with opened(database_url, admission_limit=1) as db:
        caught: list[DatabaseBusyError] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await db.session.execute(text("SELECT 2"))
            except DatabaseBusyError as exc:
                caught.append(exc)
            # The refused session took nothing and may try again once a place frees.
            await plain_response(send, 204)

        async with held(db):
            recorder = await call_http(SQLAlchemyMiddleware(app, db))

    [error] = caught
    assert "admission_limit=1" in str(error)
    assert "admission_timeout=0 s" in str(error)
    assert "pool_size + max_overflow" in str(error)
    assert recorder.status == 204


async def test_a_refusal_the_framework_turned_into_a_500_is_answered_503(
    database_url: str,
) -> None:
    async with opened(database_url, admission_limit=1) as db:

        async def endpoint(request: Request) -> PlainTextResponse:
            await db.session.execute(text("SELECT 2"))
            return PlainTextResponse("ok")

        app = SQLAlchemyMiddleware(Starlette(routes=[Route("/", endpoint)]), db)
        async with held(db):
            recorder = await call_http(app)

    assert recorder.status == 503
    assert retry_after(recorder) == [b"1"]


async def test_a_request_waits_its_turn_and_is_admitted_when_a_place_frees(
    database_url: str,
) -> None:
    async with opened(database_url, admission_limit=1, admission_timeout=10) as db:
        admitted: list[tuple[str, bool]] = []
        queued = {name: anyio.Event() for name in ("first", "second")}
        results: dict[str, int] = {}

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            name = scope["path"].strip("/")
            # The statement asks for a place before this task next yields: the request
            # is in the queue by the time the test sees the event.
            queued[name].set()
            await db.session.execute(text("SELECT 2"))
            admitted.append((name, holder.giving_back))
            await plain_response(send, 200)

        async def request(name: str) -> None:
            results[name] = (await call_http(SQLAlchemyMiddleware(app, db), f"/{name}")).status

        async with anyio.create_task_group() as group, held(db) as holder:
            group.start_soon(request, "first")
            await queued["first"].wait()
            group.start_soon(request, "second")
            await queued["second"].wait()

    # Both waited for the holder to give its place back, and came in the order they
    # arrived (first come, first served).
    assert admitted == [("first", True), ("second", True)]
    assert results == {"first": 200, "second": 200}
    assert checked_out(db) == 0


async def test_a_request_that_waited_admission_timeout_in_vain_is_answered_503(
    database_url: str,
) -> None:
    async with opened(database_url, admission_limit=1, admission_timeout=0.3) as db:
        app = SQLAlchemyMiddleware(query_app(db), db)
        async with held(db):
            started = time.monotonic()
            recorder = await call_http(app)
            elapsed = time.monotonic() - started

    assert recorder.status == 503
    assert 0.3 <= elapsed < 5
    assert checked_out(db) == 0


async def test_requests_that_do_not_use_the_database_are_never_counted_nor_refused(
    database_url: str,
) -> None:
    async with opened(database_url, admission_limit=1) as db:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            path = scope["path"]
            if path == "/lazy":
                db.session.add_all([])  # the session exists, and takes no connection
                await plain_response(send, 201)
            elif path == "/rolled-back":
                _ = db.session  # a session that ran nothing, rolled back for a 400
                await plain_response(send, 400)
            elif path == "/query":
                await db.session.execute(text("SELECT 2"))
                await plain_response(send, 200)
            else:
                await plain_response(send, 200)

        middleware = SQLAlchemyMiddleware(app, db)
        async with held(db):
            statuses = [
                (await call_http(middleware, path)).status
                for path in ("/none", "/lazy", "/rolled-back", "/query")
            ]

    # The limit is reached (the last request is refused), and the others pass.
    assert statuses == [200, 201, 400, 503]


async def test_scripts_and_new_sessions_are_not_counted(database_url: str) -> None:
    async with opened(database_url, admission_limit=1) as db:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await db.session.execute(text("SELECT 1"))  # the request's one place
            async with db.new_session() as session:
                await session.execute(text("SELECT 2"))
            await plain_response(send, 200)

        async with held(db):
            async with db.scope() as session:  # a script while the limit is reached
                await session.execute(text("SELECT 3"))
            refused = await call_http(SQLAlchemyMiddleware(app, db))
        admitted = await call_http(SQLAlchemyMiddleware(app, db))

    assert refused.status == 503
    assert admitted.status == 200


async def test_a_request_with_a_read_session_and_a_release_counts_once_at_a_time(
    database_url: str,
) -> None:
    # The "replica" is the same database: what is counted is the request, not engines.
    async with opened(database_url, admission_limit=1, replicas=[database_url]) as db:
        steps: list[str] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await db.read_session.execute(text("SELECT 1"))
            await db.session.execute(text("SELECT 2"))
            steps.append("both sessions")
            await db.release()  # gives the place back ...
            await db.session.execute(text("SELECT 3"))  # ... and takes it again
            steps.append("after release")
            await plain_response(send, 200)

        middleware = SQLAlchemyMiddleware(app, db)
        assert (await call_http(middleware)).status == 200
        async with held(db):
            refused = await call_http(middleware)

    assert steps == ["both sessions", "after release"]
    assert refused.status == 503
    assert checked_out(db) == 0


class Disconnected(OSError):
    """The client went away: the server's send raises."""


async def test_every_way_a_request_ends_gives_its_place_back(database_url: str) -> None:
    limit = 3
    async with opened(database_url, admission_limit=limit, admission_timeout=0.2) as db:
        never = anyio.Event()
        statuses: list[int] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            kind = scope["path"].strip("/")
            if kind == "none":
                await plain_response(send, 200)
                return
            if kind == "orphan":  # a deferred foreign key: the COMMIT fails
                await db.session.execute(
                    text("INSERT INTO children (id, parent_id) VALUES (:id, 999)"),
                    {"id": random.randrange(10**9)},
                )
            else:
                await db.session.execute(text("SELECT 1"))
            if kind == "raise":
                raise RuntimeError("the app failed")
            if kind == "cancel":
                await never.wait()
            if kind == "release":
                await db.release(commit=False)
                await db.session.execute(text("SELECT 2"))
            if kind == "busy-caught":
                async with db.new_session() as session:
                    await session.execute(text("SELECT 3"))
            await plain_response(send, 400 if kind == "rollback" else 200)

        middleware = SQLAlchemyMiddleware(app, db)

        async def request(kind: str, deadline: float = 0.05) -> None:
            def on_send(message: Message) -> None:
                if kind == "disconnect":
                    raise Disconnected

            recorder = ASGIRecorder([{"type": "http.request"}], on_send=on_send)
            try:
                # "cancel" requests wait for an event that never comes: a deadline
                # cancels them, holding a place, or still waiting for one.
                with anyio.move_on_after(deadline if kind == "cancel" else math.inf):
                    await recorder(middleware, http_scope(f"/{kind}"))
            except (RuntimeError, Disconnected):
                pass
            if recorder.sent:
                statuses.append(recorder.status)

        kinds = ["commit", "rollback", "raise", "orphan", "cancel", "disconnect", "release"]
        kinds += ["none", "busy-caught"]
        rng = random.Random(12)
        async with anyio.create_task_group() as group:
            # First `limit` requests hold every place past the others' admission_timeout,
            # then a mix arrives at once: refused, cancelled in the queue, or admitted.
            for _ in range(limit):
                group.start_soon(request, "cancel", 0.5)
            for _ in range(20):
                group.start_soon(request, rng.choice(kinds))
        async with anyio.create_task_group() as group:
            for _ in range(40):
                group.start_soon(request, rng.choice(kinds))

        assert 503 in statuses  # refusals ...
        assert 500 in statuses  # ... and failed commits were among the endings
        assert checked_out(db) == 0
        # Every place is free: `limit` requests are admitted at once, one more is not.
        async with held(db), held(db), held(db):
            refused = await call_http(SQLAlchemyMiddleware(query_app(db), db))
        assert refused.status == 503
        assert checked_out(db) == 0


async def test_a_request_cancelled_while_it_waits_leaves_the_queue(database_url: str) -> None:
    async with opened(database_url, admission_limit=1, admission_timeout=10) as db:
        app = SQLAlchemyMiddleware(query_app(db), db)
        async with held(db):
            with anyio.move_on_after(0.2) as waiting:  # a deadline around the request
                await call_http(app)
            assert waiting.cancelled_caught
        # Had the cancelled request stayed in the queue, the place the holder gave
        # back would have gone to it, and never come back.
        async with held(db):
            pass
        assert (await call_http(app)).status == 200


@pytest.mark.parametrize("ended_by", ["the app's deadline", "admission_timeout"])
async def test_a_request_whose_wait_ended_without_a_place_holds_none(
    database_url: str, ended_by: str
) -> None:
    timeout = 10 if ended_by == "the app's deadline" else 0.2
    async with opened(database_url, admission_limit=1, admission_timeout=timeout) as db:
        gave_up = anyio.Event()
        finish = anyio.Event()

        async def patient(scope: Scope, receive: Receive, send: Send) -> None:
            # The request goes on after its statement's wait ended: it holds no place.
            with anyio.move_on_after(0.2), suppress(DatabaseBusyError):
                await db.session.execute(text("SELECT 1"))
            gave_up.set()
            await finish.wait()
            await plain_response(send, 204)

        async with anyio.create_task_group() as group:
            async with held(db):
                group.start_soon(call_http, SQLAlchemyMiddleware(patient, db))
                await gave_up.wait()
            # The place the holder gave back is free, not kept for the patient request.
            admitted = await call_http(SQLAlchemyMiddleware(query_app(db), db))
            finish.set()

    assert admitted.status == 200
    assert checked_out(db) == 0


class WebSocketClient:
    """The server side of one websocket: the test pushes messages, the app receives them."""

    def __init__(self) -> None:
        self._in, self._out = anyio.create_memory_object_stream[Message](10)
        self.sent: list[Message] = []
        self.receiving = anyio.Event()  # set at the app's next receive()

    async def receive(self) -> Message:
        self.receiving.set()
        return await self._out.receive()

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def push(self, message: Message) -> None:
        self._in.send_nowait(message)

    def close(self) -> None:
        self._in.close()
        self._out.close()


async def test_a_websocket_holds_a_place_only_during_a_round(database_url: str) -> None:
    async with opened(database_url, admission_limit=1) as db:
        in_round = anyio.Event()
        end_round = anyio.Event()

        async def websocket(scope: Scope, receive: Receive, send: Send) -> None:
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            while (await receive())["type"] == "websocket.receive":
                await db.session.execute(text("SELECT 1"))
                in_round.set()
                await end_round.wait()
                await send({"type": "websocket.send", "text": "done"})
            await send({"type": "websocket.close", "code": 1000})

        client = WebSocketClient()
        query = SQLAlchemyMiddleware(query_app(db), db)
        async with anyio.create_task_group() as group:
            server = SQLAlchemyMiddleware(websocket, db)
            group.start_soon(server, websocket_scope(), client.receive, client.send)
            client.push({"type": "websocket.connect"})
            client.push({"type": "websocket.receive", "text": "go"})
            await in_round.wait()
            during = await call_http(query)  # the round holds the place
            client.receiving = anyio.Event()
            end_round.set()
            # The app waits for the next message: the middleware ended the round first.
            await client.receiving.wait()
            between = await call_http(query)
            client.push({"type": "websocket.disconnect", "code": 1000})
        client.close()

    assert during.status == 503
    assert between.status == 200
    assert client.sent[-2:] == [
        {"type": "websocket.send", "text": "done"},
        {"type": "websocket.close", "code": 1000},
    ]
    assert checked_out(db) == 0


# SyncDatabase: the same limit, waited for in the request's worker thread.


def sync_query(db: SyncDatabase) -> Callable[[], None]:
    def work() -> None:
        db.session.execute(text("SELECT 2"))

    return work


def threaded(work: Callable[[], object], status: int = 200) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(work)
        await plain_response(send, status)

    return app


class SyncHolder:
    """A ``def`` request holding its place until :meth:`release`."""

    def __init__(self, db: SyncDatabase) -> None:
        self.db = db
        self.holding = threading.Event()
        self.released = threading.Event()
        self.giving_back = False

    def work(self) -> None:
        self.db.session.execute(text("SELECT 1"))
        self.holding.set()
        self.released.wait(10)
        self.giving_back = True


@asynccontextmanager
async def sync_held(db: SyncDatabase) -> AsyncIterator[SyncHolder]:
    holder = SyncHolder(db)
    async with anyio.create_task_group() as group:
        group.start_soon(call_http, SQLAlchemyMiddleware(threaded(holder.work), db))
        await anyio.to_thread.run_sync(holder.holding.wait, 10)
        try:
            yield holder
        finally:
            holder.released.set()


async def test_a_sync_request_past_the_limit_is_answered_503(
    sync_opened: Callable[..., SyncDatabase],
) -> None:
    db = sync_opened(admission_limit=1)
    app = SQLAlchemyMiddleware(threaded(sync_query(db)), db)
    async with sync_held(db):
        refused = await call_http(app)
    admitted = await call_http(app)

    assert refused.status == 503
    assert retry_after(refused) == [b"1"]
    assert admitted.status == 200
    assert sync_checked_out(db) == 0


async def test_a_sync_request_waits_in_its_thread_and_is_admitted_when_a_place_frees(
    sync_opened: Callable[..., SyncDatabase],
) -> None:
    db = sync_opened(admission_limit=1, admission_timeout=10)
    asking = threading.Event()
    seen: list[bool] = []

    def work() -> None:
        asking.set()
        db.session.execute(text("SELECT 2"))
        seen.append(holder.giving_back)

    results: list[int] = []

    async def request() -> None:
        results.append((await call_http(SQLAlchemyMiddleware(threaded(work), db))).status)

    async with anyio.create_task_group() as group, sync_held(db) as holder:
        group.start_soon(request)
        await anyio.to_thread.run_sync(asking.wait, 10)

    assert results == [200]
    assert seen == [True]  # admitted once the holder gave its place back
    assert sync_checked_out(db) == 0


async def test_a_sync_request_that_waited_in_vain_is_answered_503(
    sync_opened: Callable[..., SyncDatabase],
) -> None:
    db = sync_opened(admission_limit=1, admission_timeout=0.3)
    async with sync_held(db):
        started = time.monotonic()
        refused = await call_http(SQLAlchemyMiddleware(threaded(sync_query(db)), db))
        elapsed = time.monotonic() - started

    assert refused.status == 503
    assert 0.3 <= elapsed < 5
    assert sync_checked_out(db) == 0


async def test_sync_requests_give_their_places_back_however_they_end(
    sync_opened: Callable[..., SyncDatabase],
) -> None:
    db = sync_opened(admission_limit=2, admission_timeout=0.2)

    def work(kind: str, number: int) -> Callable[[], None]:
        def run() -> None:
            if kind == "orphan":
                db.session.execute(text(f"INSERT INTO children VALUES ({number}, 999)"))
            else:
                db.session.execute(items.insert().values(key=f"k{number}"))
            if kind == "raise":
                raise RuntimeError("the app failed")

        return run

    statuses: list[int] = []

    async def request(kind: str, number: int) -> None:
        status = 400 if kind == "rollback" else 200
        app = SQLAlchemyMiddleware(threaded(work(kind, number), status), db)
        with suppress(RuntimeError):
            statuses.append((await call_http(app)).status)

    rng = random.Random(7)
    async with anyio.create_task_group() as group:
        for number in range(30):
            kind = rng.choice(["commit", "rollback", "raise", "orphan"])
            group.start_soon(request, kind, number)

    assert 500 in statuses
    assert sync_checked_out(db) == 0
    async with sync_held(db), sync_held(db):
        refused = await call_http(SQLAlchemyMiddleware(threaded(sync_query(db)), db))
    assert refused.status == 503
    assert sync_checked_out(db) == 0


# The saturation warning.


def saturation_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "saturated" in r.getMessage()]


async def hold(db: Database, count: int) -> list[Any]:
    return [await db.engine.connect() for _ in range(count)]


async def give_back(connections: list[Any]) -> None:
    for connection in connections:
        await connection.close()


async def churn(db: Database, times: int) -> None:
    """Give one connection back and take one, ``times`` times (events of a busy pool)."""
    for _ in range(times):
        async with db.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))


async def test_a_pool_saturated_for_the_configured_time_warns_once_per_episode(
    sqlite_or_asyncpg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    options = {"pool_size": 3, "max_overflow": 0, "warn_pool_saturated_for": 1.0}
    async with opened(sqlite_or_asyncpg_url, **options) as db:

        def levels() -> list[str]:
            return [r.levelname for r in saturation_records(caplog)]

        with caplog.at_level(logging.INFO, logger="asgi_sqla"):
            for episode in range(2):
                connections = await hold(db, 3)  # the whole pool (the share is 90%)
                await anyio.sleep(1.05)  # the episode lasts (what is measured: no event)
                for _ in range(5):  # a busy pool: each connection given back is taken again
                    await connections.pop().close()
                    connections.append(await db.engine.connect())
                # One warning, and these brief dips did not end the episode.
                assert levels() == ["WARNING", "INFO"] * episode + ["WARNING"]
                await give_back(connections)
                await anyio.sleep(0.15)  # below the share for longer than the grace (0.1 s)
                await churn(db, 1)  # the next event sees the episode has ended
                assert levels() == ["WARNING", "INFO"] * (episode + 1)

    records = saturation_records(caplog)
    warning = records[0].getMessage()
    assert "3 of its 3 connections checked out" in warning
    assert "pool_size=3, max_overflow=0" in warning
    assert "warned at 90% for 1 s" in warning
    assert "no longer saturated" in records[1].getMessage()


async def test_a_pool_below_the_share_or_not_for_long_does_not_warn(
    sqlite_or_asyncpg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    options = {"pool_size": 2, "max_overflow": 0, "warn_pool_saturated_for": 0.3}
    async with opened(sqlite_or_asyncpg_url, **options, pool_saturated_share=1.0) as db:
        with caplog.at_level(logging.INFO, logger="asgi_sqla"):
            connections = await hold(db, 1)  # half the pool, for longer than the time
            await anyio.sleep(0.35)
            await churn(db, 3)
            await give_back(connections)
            for _ in range(3):  # the whole pool, briefly
                await give_back(await hold(db, 2))
        assert saturation_records(caplog) == []

        # The same database does warn once the pool is full for the time.
        with caplog.at_level(logging.INFO, logger="asgi_sqla"):
            connections = await hold(db, 2)
            await anyio.sleep(0.35)
            await give_back(connections)
        assert [r.levelname for r in saturation_records(caplog)] == ["WARNING"]


async def test_a_pool_where_nothing_moves_warns_when_a_connection_comes_back(
    sqlite_or_asyncpg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    options = {"pool_size": 1, "max_overflow": 0, "warn_pool_saturated_for": 0.2}
    async with opened(sqlite_or_asyncpg_url, **options) as db:
        with caplog.at_level(logging.WARNING, logger="asgi_sqla"):
            connections = await hold(db, 1)
            await anyio.sleep(0.25)
            await give_back(connections)

    [record] = saturation_records(caplog)
    assert "1 of its 1 connections" in record.getMessage()


def test_a_saturation_warning_needs_a_pool_of_fixed_size(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    for options in (
        {"poolclass": NullPool},
        {"max_overflow": -1},
        {"pool_size": 0},
    ):
        with pytest.raises(ConfigurationError, match="pool of fixed size"):
            Database(url, warn_pool_saturated_for=10, **options)
    with pytest.raises(ConfigurationError, match="StaticPool"):
        Database("sqlite+aiosqlite://", warn_pool_saturated_for=10)  # in memory
    # An engine factory's pool is known at startup.
    from sqlalchemy.ext.asyncio import create_async_engine

    db = Database(
        engine=lambda: create_async_engine(url, poolclass=NullPool), warn_pool_saturated_for=10
    )
    with pytest.raises(ConfigurationError, match="NullPool"):
        db.engine  # noqa: B018


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"admission_limit": 0}, "admission_limit"),
        ({"admission_limit": 2.5}, "admission_limit"),
        ({"admission_limit": True}, "admission_limit"),
        ({"admission_limit": 2, "admission_timeout": -1}, "admission_timeout"),
        ({"admission_timeout": 1.0}, "admission_timeout"),
        ({"warn_pool_saturated_for": -1}, "warn_pool_saturated_for"),
        ({"warn_pool_saturated_for": 1, "pool_saturated_share": 0}, "pool_saturated_share"),
        ({"warn_pool_saturated_for": 1, "pool_saturated_share": 1.5}, "pool_saturated_share"),
    ],
)
@pytest.mark.parametrize("kind", [Database, SyncDatabase])
def test_wrong_shedding_options_are_refused(
    tmp_path: Any, options: dict[str, Any], named: str, kind: type[Any]
) -> None:
    driver = "sqlite+aiosqlite" if kind is Database else "sqlite"
    with pytest.raises(ConfigurationError, match=named):
        kind(f"{driver}:///{tmp_path / 'test.db'}", **options)


GUIDE = Path(__file__).resolve().parent.parent / "docs/guides/load-shedding.md"


def test_the_guides_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    assert blocks, "docs/guides/load-shedding.md has no Python block"
    for block in blocks:
        namespace: dict[str, Any] = {}
        exec(compile(block, str(GUIDE), "exec"), namespace)  # connects to nothing
        db = namespace["db"]
        assert isinstance(db, Database)
        assert isinstance(namespace["application"], SQLAlchemyMiddleware)


async def test_a_child_tasks_release_keeps_the_requests_place_with_session_per_task(
    database_url: str,
) -> None:
    # The request's own session and its child's share one place: the child's
    # db.release() must not give it back while the request's session holds a connection.
    async with opened(database_url, admission_limit=1, session_per_task=True) as db:
        released = anyio.Event()
        finish = anyio.Event()

        async def child() -> None:
            await db.session.execute(text("SELECT 3"))
            await db.release()

        async def holder(scope: Scope, receive: Receive, send: Send) -> None:
            await db.session.execute(text("SELECT 1"))
            async with anyio.create_task_group() as group:
                group.start_soon(child)
            released.set()
            await finish.wait()
            await plain_response(send, 200)

        async with anyio.create_task_group() as group:
            group.start_soon(call_http, SQLAlchemyMiddleware(holder, db))
            await released.wait()
            refused = await call_http(SQLAlchemyMiddleware(query_app(db), db))
            finish.set()
        assert refused.status == 503
        assert checked_out(db) == 0
        # The place came back with the request: the next one is admitted.
        assert (await call_http(SQLAlchemyMiddleware(query_app(db), db))).status == 200


async def test_a_flood_of_refusals_logs_one_warning_a_second_counting_the_rest(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(database_url, admission_limit=1) as db:
        app = SQLAlchemyMiddleware(query_app(db), db)
        with caplog.at_level(logging.WARNING, logger="asgi_sqla"):
            async with held(db):
                statuses = [(await call_http(app)).status for _ in range(20)]
                first = [r.getMessage() for r in caplog.records if "503" in r.getMessage()]
                # The throttle's interval is one second: the next refusal after it is
                # logged again, with the count of those left out.
                await anyio.sleep(1.05)
                statuses.append((await call_http(app)).status)
        assert statuses == [503] * 21
        assert len(first) == 1
        assert "admission_limit" in first[0]
        logged = [r.getMessage() for r in caplog.records if "503" in r.getMessage()]
        assert len(logged) == 2
        assert "(and 19 more such 503s since the last of these warnings)" in logged[1]
