"""Edges of the unit of work that the old middleware got wrong, one test (or family) each.

1. A session asked for while the request's last transaction is being ended (a child
   task during a slow COMMIT, an ``on_commit`` callback, ``db.scope()``) is refused with
   ``SessionEndedError``: none is opened that nobody would end.  One asked for during
   the commit at response start is ended with the work after the status line.
2. A ``commit_on`` policy that raises rolls back, answers 500, logs, and leaks nothing.
3. A ``retry`` route is never re-run once part of its work was committed.
4. A streaming body cut short by the client commits nothing it wrote after the status line.
5. A failed websocket commit is logged even when the 1011 close cannot be sent.
6. ``asgi_sqla.quart`` background tasks run only after a commit, not after a rollback
   (nor after a streamed body's failed commit, nor after ``db.release(commit=False)``).
7. Smaller ones: ``Server-Timing`` on an engine used before the middleware, a newline in
   the path of a warning, an unrelated exception after a failed commit (also when it is
   raised inside ``except CommitFailedError:``), a garbage-collected Database.
8. An ASGI 2 (double-callable) app.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
import pytest
from quart import Quart
from sqlalchemy import Connection, event, select, text
from sqlalchemy.engine.interfaces import AdaptedConnection
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_sqla import (
    CommitFailedError,
    Database,
    NoSessionContextError,
    SessionEndedError,
    SQLAlchemyMiddleware,
)
from asgi_sqla.fastapi import session_dependency
from asgi_sqla.quart import add_background_task, init_app
from asgi_sqla.types import AnyASGIApp, ASGIApp, Message, Receive, Scope, Send

from _helpers import (
    ASGIRecorder,
    add_key,
    as_asgi_app,
    call_http,
    checked_out,
    eventually,
    http_scope,
    idle_in_transaction,
    items,
    keys,
    open_database,
    orphan_child,
    plain_response,
    query,
    server_backends,
    websocket_scope,
)
from _servers import serve

pytestmark = pytest.mark.anyio

START = "http.response.start"
BODY = "http.response.body"


@pytest.fixture
def admin(request: pytest.FixtureRequest, database_url: str) -> Any:
    """The ``pg_admin`` connection on PostgreSQL, None on SQLite."""
    if database_url.startswith("postgresql"):
        return request.getfixturevalue("pg_admin")
    return None


async def assert_nothing_left_behind(db: Database, admin: Any) -> None:
    """No connection checked out; on PostgreSQL, no backend idle in a transaction."""
    assert checked_out(db) == 0
    if admin is not None:
        assert await idle_in_transaction(admin) == []


# --- 1. A session opened while the request is ending is never orphaned ------------------


class CommitGate:
    """Holds the first COMMIT on ``db``'s engine from now on until ``release`` is set.

    ``committing`` is set once that COMMIT is being held: the request's transaction is
    being ended, and stays so until the test lets it go.  The hold is a connection
    event awaiting on the driver's side (``AdaptedConnection.run_async``), so it is the
    COMMIT itself that is slow, as with a busy server.
    """

    def __init__(self, db: Database) -> None:
        self.committing = anyio.Event()
        self.release = anyio.Event()
        self._armed = True
        event.listen(db.engine.sync_engine, "commit", self._hold)

    def _hold(self, connection: Connection) -> None:
        if not self._armed:
            return
        self._armed = False
        self.committing.set()
        adapted = cast(AdaptedConnection, connection.connection.dbapi_connection)
        adapted.run_async(lambda _driver: self.release.wait())


async def use_db_session(db: Database, key: str) -> BaseException | str:
    """Read ``db.session`` and write ``key`` with it; the error it raised, or what it did."""
    try:
        session = db.session
    except SessionEndedError as exc:
        return exc
    try:
        await session.execute(items.insert().values(key=key))
    except Exception as exc:  # the old middleware: the write itself may fail (SQLite lock)
        return exc
    return "opened a session and wrote"


async def test_a_child_task_reading_db_session_during_the_slow_last_commit_gets_session_ended_error(
    db: Database, admin: Any
) -> None:
    # The request's last transaction ends after the app returned (it wrote after its
    # response): a session opened now would belong to nobody, so none opens.
    gate = CommitGate(db)
    seen: list[BaseException | str] = []
    children: list[asyncio.Task[None]] = []

    async def child() -> None:
        await gate.committing.wait()
        try:
            seen.append(await use_db_session(db, "child"))
        finally:
            gate.release.set()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await plain_response(send, 200)  # the write below ends when the app returns
        await add_key(db, "request")
        children.append(asyncio.create_task(child()))  # a copy of the request's context

    with anyio.fail_after(20):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))
        await children[0]

    assert recorder.status == 200
    await assert_nothing_left_behind(db, admin)
    assert await keys(db) == {"request"}
    assert len(seen) == 1, seen
    assert isinstance(seen[0], SessionEndedError), seen


async def test_a_child_task_opening_a_session_as_the_response_starts_is_ended_with_the_request(
    db: Database, admin: Any
) -> None:
    # The commit at response start ends the sessions open when the start was sent; a
    # session opened meanwhile belongs to the work after the status line, and the unit
    # of work ends it with that (committed: the response went out whole).
    gate = CommitGate(db)
    children: list[asyncio.Task[None]] = []

    async def child() -> None:
        await gate.committing.wait()
        session = db.session  # while the request's COMMIT is under way
        gate.release.set()  # SQLite: the request's COMMIT holds the write lock till then
        await session.execute(items.insert().values(key="child"))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "request")
        children.append(asyncio.create_task(child()))
        await plain_response(send, 200)
        await children[0]  # the child's work is the request's, after the status line

    with anyio.fail_after(20):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    await assert_nothing_left_behind(db, admin)
    assert await keys(db) == {"request", "child"}


@pytest.mark.parametrize(
    ("when", "committed"),
    [("at response start", {"request", "callback"}), ("after the app returned", {"request"})],
)
async def test_an_on_commit_callback_reading_db_session_is_ended_with_the_request_or_refused(
    db: Database, admin: Any, when: str, committed: set[str]
) -> None:
    # At response start the callback's session belongs to the work after the status
    # line (committed: the response went out whole); after the app returned, when the
    # request's last transaction ends, no session opens.
    seen: list[BaseException | str] = []

    async def callback() -> None:
        seen.append(await use_db_session(db, "callback"))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if when == "after the app returned":
            await plain_response(send, 200)
        await add_key(db, "request")
        db.on_commit(callback)
        if when == "at response start":
            await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    await assert_nothing_left_behind(db, admin)
    assert await keys(db) == committed
    assert len(seen) == 1, seen
    if when == "at response start":
        assert seen == ["opened a session and wrote"]
    else:
        assert isinstance(seen[0], SessionEndedError), seen


async def test_an_on_commit_callback_of_db_scope_reading_db_session_gets_session_ended_error(
    db: Database, admin: Any
) -> None:
    seen: list[BaseException | str] = []

    async def callback() -> None:
        seen.append(await use_db_session(db, "callback"))

    async with db.scope():
        await add_key(db, "scope")
        db.on_commit(callback)

    await assert_nothing_left_behind(db, admin)
    assert await keys(db) == {"scope"}
    assert len(seen) == 1, seen
    assert isinstance(seen[0], SessionEndedError), seen


# --- 2. A commit_on that raises leaks nothing ---------------------------------------------


async def test_a_commit_on_policy_that_raises_answers_500_logs_the_error_and_leaks_nothing(
    database_url: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asgi_sqla")
    db = await open_database(
        database_url,
        commit_on=lambda status: {200: True}[status],  # KeyError for anything but 200
        pool_size=1,
        max_overflow=0,
        pool_timeout=2,
    )
    try:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, scope["path"].strip("/"))
            await plain_response(send, 409)

        middleware = SQLAlchemyMiddleware(app, db)
        for n in range(3):
            recorder = await call_http(middleware, f"/conflict-{n}")
            assert recorder.status == 500
            assert checked_out(db) == 0

        assert await keys(db) == set()
        errors = [r for r in caplog.records if r.name == "asgi_sqla" and r.levelno >= logging.ERROR]
        policy = [r for r in errors if "commit_on" in r.getMessage()]
        assert len(policy) == 3, caplog.text  # one for each request
        assert all("KeyError" in r.getMessage() for r in policy), caplog.text
        assert all(r.exc_info is not None and r.exc_info[0] is KeyError for r in policy)
        await assert_nothing_left_behind(db, admin)
    finally:
        await db.dispose()


# --- 3. A retry after a partial commit does not write twice -------------------------------

_CONFLICT_DDL = (
    "CREATE FUNCTION conflict() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "RAISE EXCEPTION 'a serialization failure at commit' USING ERRCODE = '40001'; END $$",
    "CREATE CONSTRAINT TRIGGER conflict_at_commit AFTER INSERT ON items "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION conflict()",
    "CREATE FUNCTION raise_conflict() RETURNS integer LANGUAGE plpgsql AS $$ BEGIN "
    "RAISE EXCEPTION 'a serialization failure now' USING ERRCODE = '40001'; END $$",
)


@pytest.fixture
async def first_and_conflicting(
    tmp_path: Path, postgresql_url: str
) -> AsyncIterator[tuple[Database, Database]]:
    """A SQLite database, and a PostgreSQL one where every COMMIT of an item fails (40001).

    On the second, ``SELECT raise_conflict()`` fails at once with a serialization failure.
    """
    first = await open_database(f"sqlite+aiosqlite:///{tmp_path / 'first.db'}")
    second = await open_database(postgresql_url)
    async with second.engine.begin() as connection:
        for statement in _CONFLICT_DDL:
            await connection.execute(text(statement))
    try:
        yield first, second
    finally:
        await first.dispose()
        await second.dispose()


async def test_a_retry_route_is_not_rerun_when_the_second_database_conflicts_at_commit(
    first_and_conflicting: tuple[Database, Database],
) -> None:
    first, second = first_and_conflicting
    runs = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal runs
        runs += 1
        await add_key(first, f"run-{runs}")
        await add_key(second, f"run-{runs}")  # its COMMIT fails with 40001
        await plain_response(send, 201)

    middleware = SQLAlchemyMiddleware(app, first, second, retry=["/w"])
    recorder = await call_http(middleware, "/w", method="POST")

    assert recorder.status == 500
    assert runs == 1
    assert await keys(first) == {"run-1"}
    assert await keys(second) == set()
    assert checked_out(first) == 0
    assert checked_out(second) == 0


@pytest.mark.parametrize("ending", ["commit", "release"])
async def test_a_retry_route_is_not_rerun_after_the_handler_committed_the_first_database(
    first_and_conflicting: tuple[Database, Database], ending: str
) -> None:
    first, second = first_and_conflicting
    runs = 0

    async def handler(request: Request) -> Response:
        nonlocal runs
        runs += 1
        await add_key(first, f"run-{runs}")
        if ending == "commit":
            await first.commit()
        else:
            await first.release()
        await second.session.execute(text("SELECT raise_conflict()"))  # 40001, now
        return PlainTextResponse("unreachable")

    app = Starlette(routes=[Route("/w", handler, methods=["POST"])])
    middleware = SQLAlchemyMiddleware(app, first, second, retry=["/w"])
    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])

    # Starlette's ServerErrorMiddleware answers 500, then re-raises for the server's log.
    with pytest.raises(DBAPIError) as raised:
        await recorder(middleware, http_scope("/w", method="POST"))

    assert getattr(raised.value.orig, "sqlstate", None) == "40001"
    assert recorder.status == 500
    assert runs == 1
    assert await keys(first) == {"run-1"}
    assert checked_out(first) == 0
    assert checked_out(second) == 0


# --- 4. A streaming body cut short by the client commits nothing after the status line ----

CHUNKS = 5


def streaming_app(db: Database) -> ASGIApp:
    """Starlette: a body of CHUNKS chunks, each after a row written through ``db.session``."""

    async def stream(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for n in range(CHUNKS):
                await db.session.execute(items.insert().values(key=f"row-{n}"))
                yield f"{n};".encode()

        return StreamingResponse(body(), media_type="text/plain")

    return SQLAlchemyMiddleware(Starlette(routes=[Route("/stream", stream)]), db)


class LeavingClient:
    """An HTTP client that reads ``keep`` body chunks, then stops reading and leaves.

    ASGI 2.3 (uvicorn's): once the ``keep``-th chunk was sent, the next ``send`` blocks
    (the client no longer reads: the socket buffers are full) and ``receive`` returns
    ``http.disconnect`` (the client closed the connection).  Starlette then cancels the
    stream and returns normally.  ASGI 2.4: the next ``send`` raises ``OSError``.
    """

    def __init__(self, keep: int | None, spec_version: str = "2.3") -> None:
        self.keep = keep
        self.spec_version = spec_version
        self.chunks: list[bytes] = []
        self.sent: list[Message] = []
        self._left = anyio.Event()
        self._requested = False

    async def receive(self) -> Message:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == BODY and self.keep is not None and len(self.chunks) == self.keep:
            self._left.set()
            if self.spec_version >= "2.4":
                raise OSError("the client has gone")
            await anyio.Event().wait()  # never read: cancelled when Starlette stops
        self.sent.append(message)
        if message["type"] == BODY and message.get("body"):
            self.chunks.append(message["body"])

    async def __call__(self, app: ASGIApp) -> None:
        scope = http_scope("/stream")
        scope["asgi"] = {"version": "3.0", "spec_version": self.spec_version}
        await app(scope, self.receive, self.send)


async def test_a_stream_the_client_leaves_after_three_chunks_commits_none_of_its_rows(
    db: Database, admin: Any
) -> None:
    client = LeavingClient(keep=3)

    with anyio.fail_after(20):
        await client(streaming_app(db))

    assert client.chunks == [b"0;", b"1;", b"2;"]
    assert await keys(db) == set()
    await assert_nothing_left_behind(db, admin)


async def test_a_stream_whose_send_raises_after_three_chunks_commits_none_of_its_rows(
    db: Database, admin: Any
) -> None:
    from starlette.requests import ClientDisconnect

    client = LeavingClient(keep=3, spec_version="2.4")

    with anyio.fail_after(20), pytest.raises(ClientDisconnect):
        await client(streaming_app(db))

    assert client.chunks == [b"0;", b"1;", b"2;"]
    assert await keys(db) == set()
    await assert_nothing_left_behind(db, admin)


async def test_a_stream_read_to_its_end_commits_every_row(db: Database, admin: Any) -> None:
    client = LeavingClient(keep=None)

    await client(streaming_app(db))

    assert len(client.chunks) == CHUNKS
    assert await keys(db) == {f"row-{n}" for n in range(CHUNKS)}
    await assert_nothing_left_behind(db, admin)


@pytest.fixture(scope="module")
def cut_short_server(module_database_url: str) -> Iterator[str]:
    """uvicorn serving ``tests/apps/cut_short_app.py``; yields its base URL."""
    with serve(
        "tests.apps.cut_short_app:app",
        "uvicorn",
        env={"DATABASE_URL": module_database_url},
        ready_path="/health",
    ) as server:
        yield server.url


def committed_with_prefix(url: str, prefix: str) -> int:
    return int(query(url, f"SELECT count(*) FROM items WHERE key LIKE '{prefix}-%'")[0][0])


def no_transaction_left_open(url: str) -> bool:
    if not url.startswith("postgresql"):
        return True
    return eventually(lambda: all(state == "idle" for _, state, _ in server_backends(url)))


def test_uvicorn_a_stream_the_client_closes_after_three_chunks_commits_none_of_its_rows(
    cut_short_server: str, module_database_url: str
) -> None:
    with httpx.Client(base_url=cut_short_server, timeout=10) as client:
        # Three rows, then chunks without end: it ends only because the client leaves.
        with client.stream("GET", "/stream/left/3/100000000") as response:
            assert response.status_code == 200
            received = b""
            for data in response.iter_raw():
                received += data
                if received.count(b";") >= 3:
                    break
        # The connection is closed (the body was not read to its end); the request's
        # session ends once uvicorn tells Starlette that the client has gone.
        assert eventually(lambda: client.get("/pool").text == "0")

    assert committed_with_prefix(module_database_url, "left") == 0  # of the 3 written
    assert no_transaction_left_open(module_database_url)


def test_uvicorn_a_stream_read_to_its_end_commits_every_row(
    cut_short_server: str, module_database_url: str
) -> None:
    with httpx.Client(base_url=cut_short_server, timeout=10) as client:
        response = client.get("/stream/whole/5/5")

    assert response.status_code == 200
    assert response.content.count(b";") == 5
    # Committed when the app returns, which may be just after the client read the end.
    assert eventually(lambda: committed_with_prefix(module_database_url, "whole") == 5)
    assert no_transaction_left_open(module_database_url)


# --- 5. A failed websocket commit is always logged ----------------------------------------


@pytest.mark.parametrize("error", [OSError, RuntimeError])
async def test_a_failed_websocket_commit_is_logged_when_the_1011_close_cannot_be_sent(
    db: Database, caplog: pytest.LogCaptureFixture, error: type[Exception]
) -> None:
    caplog.set_level(logging.ERROR, logger="asgi_sqla")
    seen: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await orphan_child(db)  # passes now, fails at COMMIT
        try:
            await receive()  # the transaction commits here, and fails
        except Exception as exc:
            seen.append(exc)

    def gone(message: Message) -> None:
        if message["type"] == "websocket.close":
            raise error("the client has gone")

    recorder = ASGIRecorder([{"type": "websocket.connect"}], on_send=gone)
    await recorder(SQLAlchemyMiddleware(app, db), websocket_scope())

    assert len(seen) == 1, seen
    assert isinstance(seen[0], CommitFailedError), seen
    errors = [r for r in caplog.records if r.name == "asgi_sqla" and r.levelno >= logging.ERROR]
    assert any("failed to commit" in r.getMessage() for r in errors), caplog.text
    assert checked_out(db) == 0


# --- 6. Quart background tasks after a rollback -------------------------------------------


async def post_and_wait_for_background_tasks(app: Quart, db: Database) -> ASGIRecorder:
    """Mount the middleware and ``init_app`` on ``app``, POST ``/``, await its tasks."""
    app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)  # type: ignore[method-assign]
    init_app(app)
    recorder = await call_http(as_asgi_app(app), "/", method="POST")
    with anyio.fail_after(10):
        await asyncio.gather(*app.background_tasks)
    return recorder


@pytest.mark.parametrize(
    ("rollback_only", "runs"), [(True, False), (False, True)], ids=["rollback-only", "committed"]
)
async def test_a_quart_background_task_runs_only_when_the_request_committed(
    db: Database, rollback_only: bool, runs: bool
) -> None:
    app = Quart(__name__)
    started: list[str] = []

    async def task() -> None:
        started.append("task")
        await add_key(db, "task")

    @app.post("/")
    async def handler() -> tuple[str, int]:
        await add_key(db, "request")
        if rollback_only:
            db.set_rollback_only()
        add_background_task(task)
        return "ok", 200

    recorder = await post_and_wait_for_background_tasks(app, db)

    assert recorder.status == 200
    assert started == (["task"] if runs else [])
    assert await keys(db) == ({"request", "task"} if runs else set())
    assert checked_out(db) == 0


async def test_a_quart_background_task_never_runs_when_the_streamed_bodys_commit_fails(
    db: Database,
) -> None:
    app = Quart(__name__)
    started: list[str] = []

    async def task() -> None:
        started.append("task")

    @app.post("/")
    async def handler() -> tuple[AsyncIterator[bytes], int]:
        add_background_task(task)

        async def body() -> AsyncIterator[bytes]:
            await add_key(db, "in the body")
            await orphan_child(db)  # passes now, fails at COMMIT, after the app returned
            yield b"streamed"

        return body(), 200

    recorder = await post_and_wait_for_background_tasks(app, db)

    assert recorder.status == 200
    assert await keys(db) == set()
    assert started == []
    assert checked_out(db) == 0


async def test_a_quart_background_task_never_runs_after_the_handler_released_with_a_rollback(
    db: Database,
) -> None:
    app = Quart(__name__)
    started: list[str] = []

    async def task() -> None:
        started.append("task")

    @app.post("/")
    async def handler() -> tuple[str, int]:
        await add_key(db, "request")
        await db.release(commit=False)
        add_background_task(task)
        return "ok", 200

    recorder = await post_and_wait_for_background_tasks(app, db)

    assert recorder.status == 200
    assert await keys(db) == set()
    assert started == []
    assert checked_out(db) == 0


# --- 7. Smaller ones ----------------------------------------------------------------------


async def test_server_timing_counts_the_queries_on_an_engine_made_before_the_middleware(
    db: Database,
) -> None:
    # Startup code used the database before the middleware was made (no lifespan).
    async with db.scope():
        await db.session.execute(select(1))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.session.execute(select(1))
        await db.session.execute(select(items.c.key))
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db, server_timing=True))

    headers = dict(recorder.sent[0]["headers"])
    round_trips = 3 if db.engine.dialect.name == "sqlite" else 4  # + COMMIT, + BEGIN on PG
    expected = f'desc="2 queries, {round_trips} round trips"'.encode()
    assert expected in headers[b"server-timing"], headers


async def test_a_newline_in_the_path_does_not_forge_a_line_of_the_n_plus_1_warning(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_sqla")
    db = await open_database(database_url, warn_statements_over=0)
    try:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await db.session.execute(select(1))
            await plain_response(send, 200)

        recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
        await recorder(SQLAlchemyMiddleware(app, db), http_scope("/x\nFORGED"))
    finally:
        await db.dispose()

    warnings = [r for r in caplog.records if r.name == "asgi_sqla" and "N+1" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "FORGED" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


@pytest.mark.parametrize(
    "where",
    [
        "after handling it",
        "while handling it",
        "while handling it, from None",
    ],
)
async def test_an_unrelated_exception_raised_after_a_failed_commit_is_logged_at_error(
    db: Database, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    caplog.set_level(logging.ERROR, logger="asgi_sqla")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await orphan_child(db)  # passes now, fails at COMMIT
        try:
            await plain_response(send, 201)
        except CommitFailedError:
            if where == "while handling it":
                raise ValueError("an unrelated bug")  # noqa: B904 -- the case under test
            if where == "while handling it, from None":
                raise ValueError("an unrelated bug") from None
        raise ValueError("an unrelated bug")

    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    reraised: list[ValueError] = []
    try:
        await recorder(SQLAlchemyMiddleware(app, db), http_scope())
    except ValueError as exc:  # the server would log it: as good as the middleware doing so
        reraised.append(exc)

    logged = [
        r
        for r in caplog.records
        if r.name == "asgi_sqla"
        and r.levelno >= logging.ERROR
        and r.exc_info is not None
        and r.exc_info[0] is ValueError
    ]
    assert reraised or len(logged) == 1, caplog.text
    assert recorder.status == 500
    assert checked_out(db) == 0


async def test_session_dependency_of_a_garbage_collected_database_says_how_to_fix_it() -> None:
    dependency = session_dependency(Database("sqlite+aiosqlite://"))
    gc.collect()  # a Database refers to itself (its session factory): collect the cycle

    with pytest.raises(NoSessionContextError) as raised:
        await dependency()

    message = str(raised.value)
    assert "garbage-collected" in message
    assert "db = Database(url)" in message
    assert "SQLAlchemyMiddleware(app, db)" in message


# --- 8. ASGI 2 apps -----------------------------------------------------------------------


async def test_an_asgi2_double_callable_app_class_works_behind_the_middleware(
    db: Database,
) -> None:
    class ASGI2App:
        """An ASGI 2 app: instantiated with the scope, then called with receive and send."""

        def __init__(self, scope: Scope) -> None:
            self.scope = scope

        async def __call__(self, receive: Receive, send: Send) -> None:
            await add_key(db, self.scope["path"].strip("/"))
            await plain_response(send, 201)

    recorder = await call_http(SQLAlchemyMiddleware(cast(AnyASGIApp, ASGI2App), db), "/asgi2")

    assert recorder.status == 201
    assert await keys(db) == {"asgi2"}
    assert checked_out(db) == 0


async def test_an_asgi2_double_callable_app_function_works_behind_the_middleware(
    db: Database,
) -> None:
    def asgi2_app(scope: Scope) -> Callable[[Receive, Send], Awaitable[None]]:
        async def instance(receive: Receive, send: Send) -> None:
            await add_key(db, scope["path"].strip("/"))
            await plain_response(send, 201)

        return instance

    recorder = await call_http(SQLAlchemyMiddleware(cast(AnyASGIApp, asgi2_app), db), "/fn")

    assert recorder.status == 201
    assert await keys(db) == {"fn"}
    assert checked_out(db) == 0


async def test_a_websocket_sender_task_writing_while_the_receiver_commits_is_not_refused(
    db: Database, admin: Any
) -> None:
    # A websocket app often sends from one task and receives in another.  The receiver
    # waiting in receive() ends the current transaction; a session the sender opens
    # meanwhile belongs to the next round and commits with it (here: at the close).
    gate = CommitGate(db)
    sender_wrote = anyio.Event()
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "hi"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await add_key(db, "receiver")

        async def sender() -> None:
            await gate.committing.wait()
            session = db.session  # while the receiver's transaction is being committed
            gate.release.set()  # SQLite: that COMMIT holds the write lock till then
            await session.execute(items.insert().values(key="sender"))
            sender_wrote.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(sender)
            assert (await receive())["text"] == "hi"  # commits "receiver", held by the gate
            await sender_wrote.wait()
        await send({"type": "websocket.close", "code": 1000})  # commits "sender"

    with anyio.fail_after(20):
        await SQLAlchemyMiddleware(app, db)(websocket_scope(), receive, send)

    assert sent[-1] == {"type": "websocket.close", "code": 1000}
    await assert_nothing_left_behind(db, admin)
    assert await keys(db) == {"receiver", "sender"}


async def test_a_websocket_close_sent_while_the_receiver_commits_waits_for_that_commit(
    db: Database, admin: Any
) -> None:
    # The sender task opens a session and closes the socket while the receiver's
    # transaction is still being committed in receive(): the close's ending waits for
    # that one to finish, then ends the sender's session; neither task sees an error.
    gate = CommitGate(db)
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "hi"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await add_key(db, "receiver")

        async def close() -> None:
            await send({"type": "websocket.close", "code": 1000})

        async def sender() -> None:
            await gate.committing.wait()
            try:
                db.session.add_all([])  # a session of the sender's, opened mid-commit
                closing = asyncio.create_task(close())
                await asyncio.sleep(0)  # one turn of the loop: the close reaches the middleware
                assert not closing.done(), closing
            finally:
                gate.release.set()  # the held COMMIT never outlives the test
            await closing

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(sender)
            assert (await receive())["text"] == "hi"  # commits "receiver", held by the gate

    with anyio.fail_after(20):
        await SQLAlchemyMiddleware(app, db)(websocket_scope(), receive, send)

    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    await assert_nothing_left_behind(db, admin)
    assert await keys(db) == {"receiver"}
