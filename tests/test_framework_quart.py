"""Quart: a failed startup in real servers, and Quart's own habits in-process.

``examples/quart_app.py``'s API in real servers is tested with the other examples in
``tests/test_frameworks.py``.  The tests here pin down what Quart does differently
from Starlette (background tasks that start at once, websocket messages read ahead,
errors and disconnects that end a websocket "normally", a lifespan that keeps waiting
after ``startup.failed``) and check that ``asgi_sqla.quart`` keeps the package's
promises there.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from quart import Quart, Response, websocket
from quart import request as quart_request
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_sqla import ConfigurationError, Database, SQLAlchemyMiddleware
from asgi_sqla.quart import add_background_task, init_app
from asgi_sqla.types import Message, Scope

from _framework import (
    POOL_DISPOSED,
    STARTUP_FAILURE_EXIT_CODES,
)
from _helpers import (
    ASGIRecorder,
    add_key,
    as_asgi_app,
    call_http,
    checked_out,
    http_scope,
    keys,
    orphan_child,
    server_logging_env,
    started_engine,
    websocket_scope,
)
from _servers import SERVERS, serve, server_available

pytestmark = pytest.mark.anyio

TARGET = "examples.quart_app:app"


# --- A failed startup in real servers -------------------------------------------------


@pytest.mark.parametrize("name", SERVERS)
def test_when_quarts_own_startup_fails_the_server_exits_although_quart_keeps_waiting(
    name: str, tmp_path: Path
) -> None:
    # The database answers (a read-only SQLite file), but creating the tables in the
    # app's before_serving fails: Quart sends lifespan.startup.failed and goes back to
    # receive(), waiting for a message the server will not send.
    if not server_available(name):
        pytest.skip(f"{name} is not installed")
    path = tmp_path / "read-only.db"
    path.touch()
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true",
        **server_logging_env(tmp_path),
    }

    with (
        pytest.raises(RuntimeError, match=r"exited with (-?\d+)") as failed,
        serve(TARGET, name, env=env, ready_path="/notes", startup_timeout=15),
    ):
        pass

    log = str(failed.value)
    exit_code = re.search(r"exited with (-?\d+)", log)
    assert exit_code is not None
    assert int(exit_code.group(1)) == STARTUP_FAILURE_EXIT_CODES[name], log
    assert "readonly database" in log
    # The middleware disposed the engine when Quart's startup.failed went through.
    assert POOL_DISPOSED in log


# --- Quart's habits, in-process --------------------------------------------------------


@pytest.fixture
def database_url(sqlite_or_asyncpg_url: str) -> str:
    """What is under test here is the framework's way of calling the app, not the driver."""
    return sqlite_or_asyncpg_url


async def wait_for_background_tasks(app: Quart) -> None:
    with anyio.fail_after(10):
        await asyncio.gather(*app.background_tasks)


async def test_quarts_own_background_task_starts_at_once_and_shares_the_requests_session(
    db: Database,
) -> None:
    # Why asgi_sqla.quart exists: app.add_background_task creates the task right away,
    # in a copy of the request's context.  It runs while the request is still going
    # and gets the request's own session, whose fate the response's status decides.
    app = Quart(__name__)
    seen: list[AsyncSession] = []
    task_ran = anyio.Event()

    async def task() -> None:
        seen.append(db.session)
        await add_key(db, "from-the-task")
        task_ran.set()

    @app.post("/")
    async def handler() -> tuple[str, int]:
        seen.append(db.session)
        app.add_background_task(task)
        await task_ran.wait()  # the request is still running
        return "refused", 409

    app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)  # type: ignore[method-assign]

    recorder = await call_http(as_asgi_app(app), "/", method="POST")
    await wait_for_background_tasks(app)

    assert recorder.status == 409
    assert seen[0] is seen[1]
    # The task's write was the request's, and the 409 rolled it back.
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_add_background_task_runs_after_the_response_with_a_session_of_its_own(
    db: Database,
) -> None:
    app = Quart(__name__)
    sent: list[Message] = []
    seen: dict[str, Any] = {}

    async def task(key: str) -> None:
        seen["sent when the task started"] = [message["type"] for message in sent]
        seen["task session"] = db.session
        await add_key(db, key)

    @app.post("/")
    async def handler() -> tuple[str, int]:
        await add_key(db, "request")
        seen["request session"] = db.session
        add_background_task(task, key="task")
        return "created", 201

    app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)  # type: ignore[method-assign]
    init_app(app)

    recorder = await call_http(as_asgi_app(app), "/", method="POST", on_send=sent.append)
    await wait_for_background_tasks(app)

    assert recorder.status == 201
    assert seen["sent when the task started"][0] == "http.response.start"
    assert seen["sent when the task started"][-1] == "http.response.body"
    assert sent[-1]["more_body"] is False
    assert seen["task session"] is not seen["request session"]
    assert await keys(db) == {"request", "task"}
    assert checked_out(db) == 0


async def test_add_background_task_never_runs_after_a_failed_commit(db: Database) -> None:
    app = Quart(__name__)
    started: list[str] = []

    async def task() -> None:
        started.append("task")
        await add_key(db, "task")

    @app.post("/")
    async def handler() -> tuple[str, int]:
        await add_key(db, "request")
        await orphan_child(db)  # passes now, fails at COMMIT
        add_background_task(task)
        return "created", 201

    app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)  # type: ignore[method-assign]
    init_app(app)

    recorder = await call_http(as_asgi_app(app), "/", method="POST")
    await wait_for_background_tasks(app)

    assert recorder.status == 500
    assert recorder.types() == ["http.response.start", "http.response.body"]
    assert started == []
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_add_background_task_without_init_app_says_to_call_it() -> None:
    db = Database("sqlite+aiosqlite://")  # never connected: the error comes first
    app = Quart(__name__)
    errors: list[Exception] = []

    @app.get("/")
    async def handler() -> str:
        try:
            add_background_task(print)
        except ConfigurationError as exc:
            errors.append(exc)
        return "ok"

    app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)  # type: ignore[method-assign]

    assert (await call_http(as_asgi_app(app), "/")).status == 200
    assert "asgi_sqla.quart.init_app(app)" in str(errors[0])


@pytest.mark.parametrize("waiting_in", ["the handler", "the request body"])
async def test_a_client_that_leaves_mid_request_leaves_nothing_committed_and_no_task_run(
    db: Database, waiting_in: str
) -> None:
    # Quart cancels the handler when http.disconnect comes (0.23: the reader task cancels
    # it, and a body still awaited raises ClientDisconnectedError) and returns normally,
    # without a response: the write must roll back, and its background task never run.
    app = Quart(__name__)
    wrote, started = anyio.Event(), []

    async def task() -> None:
        started.append("task")

    @app.post("/")
    async def handler() -> tuple[str, int]:
        await add_key(db, "request")
        add_background_task(task)
        wrote.set()
        if waiting_in == "the request body":
            await quart_request.get_data()  # the rest of the body never comes
        else:
            await anyio.sleep_forever()
        return "created", 201

    app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)  # type: ignore[method-assign]
    init_app(app)
    recorder = ASGIRecorder([{"type": "http.request", "body": b"part", "more_body": True}])

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(recorder, as_asgi_app(app), http_scope(method="POST"))
        with anyio.fail_after(10):
            await wrote.wait()
        recorder.disconnect()
    await wait_for_background_tasks(app)

    assert recorder.sent == []
    assert started == []
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_a_body_that_quart_cuts_short_at_its_timeout_rolls_back_before_the_client_leaves(
    db: Database,
) -> None:
    # Quart stops sending a response at its RESPONSE_TIMEOUT and its handler returns,
    # the response unfinished.  Quart 0.23 then waits for the client's disconnect
    # before its ASGI call returns: the middleware alone would hold the body's
    # session, idle in transaction, until the client gives up.
    app = Quart(__name__)
    body_wrote, checked_in = anyio.Event(), anyio.Event()

    @app.get("/")
    async def handler() -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"first;"
            await add_key(db, "streamed")
            body_wrote.set()
            await anyio.sleep_forever()  # until Quart's timeout cancels it
            yield b"never sent"

        response = Response(body())
        response.timeout = 1  # from the start of the response: ample for one INSERT
        return response

    app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)  # type: ignore[method-assign]
    init_app(app)
    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    event.listen(db.engine.sync_engine, "checkin", lambda *args: checked_in.set())

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(recorder, as_asgi_app(app), http_scope())
        with anyio.fail_after(10):
            await checked_in.wait()  # the client is still connected
        held_while_connected = checked_out(db)
        recorder.disconnect()

    assert body_wrote.is_set()
    assert held_while_connected == 0
    assert recorder.body == b"first;"
    assert await keys(db) == set()
    assert checked_out(db) == 0


def test_init_app_without_the_middleware_asks_for_the_databases() -> None:
    with pytest.raises(ConfigurationError, match=r"init_app\(app, db\)"):
        init_app(Quart(__name__))


class WebsocketClient:
    """Drives one websocket connection of an ASGI app: a client whose messages we script."""

    def __init__(self, app: Any, scope: Scope) -> None:
        self.app = app
        self.scope = scope
        self._incoming: asyncio.Queue[Message] = asyncio.Queue()
        self._sent: asyncio.Queue[Message] = asyncio.Queue()
        self._incoming.put_nowait({"type": "websocket.connect"})

    async def run(self) -> None:
        await self.app(self.scope, self._incoming.get, self._sent.put)

    def send_text(self, text: str) -> None:
        self._incoming.put_nowait({"type": "websocket.receive", "text": text})

    def disconnect(self) -> None:
        self._incoming.put_nowait({"type": "websocket.disconnect", "code": 1001})

    async def next_sent(self) -> Message:
        with anyio.fail_after(10):
            return await self._sent.get()


def websocket_app(db: Database, *, adapter: bool, handler_written: anyio.Event) -> Quart:
    """A Quart websocket that writes each message as a key, then raises or hangs on request."""
    app = Quart(__name__)

    @app.websocket("/ws")
    async def handler() -> None:
        while True:
            text = await websocket.receive()
            assert isinstance(text, str)
            key, _, then = text.partition(":")
            await add_key(db, key)
            if then == "raise":
                raise RuntimeError(f"failed after writing {key}")
            if then == "hang":
                handler_written.set()
                await anyio.sleep_forever()  # until the disconnect cancels it
            await websocket.send(key)

    app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)  # type: ignore[method-assign]
    if adapter:
        init_app(app)
    return app


@pytest.mark.parametrize(
    ("adapter", "committed"), [(False, {"kept", "half-done"}), (True, {"kept"})]
)
async def test_a_websocket_handler_that_raises_after_a_write_rolls_it_back_with_init_app(
    db: Database, adapter: bool, committed: set[str]
) -> None:
    # Quart logs the handler's error and closes the socket normally (1000): without
    # init_app the middleware takes that for success and commits the half-done message.
    app = websocket_app(db, adapter=adapter, handler_written=anyio.Event())
    client = WebsocketClient(app, websocket_scope(scheme="ws"))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(client.run)
        assert (await client.next_sent())["type"] == "websocket.accept"
        client.send_text("kept")
        assert (await client.next_sent())["text"] == "kept"
        client.send_text("half-done:raise")
        assert await client.next_sent() == {"type": "websocket.close", "code": 1000}
        client.disconnect()

    assert await keys(db) == committed
    assert checked_out(db) == 0


@pytest.mark.parametrize(
    ("adapter", "committed"), [(False, {"kept", "half-done"}), (True, {"kept"})]
)
async def test_a_websocket_handler_cancelled_by_a_disconnect_rolls_back_with_init_app(
    db: Database, adapter: bool, committed: set[str]
) -> None:
    # Quart cancels the handler when the client goes away, then returns normally.
    written = anyio.Event()
    app = websocket_app(db, adapter=adapter, handler_written=written)
    client = WebsocketClient(app, websocket_scope(scheme="ws"))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(client.run)
        assert (await client.next_sent())["type"] == "websocket.accept"
        client.send_text("kept")
        assert (await client.next_sent())["text"] == "kept"
        client.send_text("half-done:hang")
        with anyio.fail_after(10):
            await written.wait()
        client.disconnect()

    assert await keys(db) == committed
    assert checked_out(db) == 0


async def test_without_init_app_an_idle_quart_websocket_keeps_its_transaction_open(
    db: Database,
) -> None:
    # Quart's reader task is already in receive() when the handler writes, so the
    # middleware's commit-on-receive only happens when the next message arrives.
    app = websocket_app(db, adapter=False, handler_written=anyio.Event())
    client = WebsocketClient(app, websocket_scope(scheme="ws"))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(client.run)
        assert (await client.next_sent())["type"] == "websocket.accept"
        client.send_text("first")
        assert (await client.next_sent())["text"] == "first"
        # The handler is back in receive(), waiting: nothing ends its transaction.
        idle_checked_out = checked_out(db)
        committed_while_idle = await keys(db)
        client.disconnect()

    assert idle_checked_out == 1
    assert committed_while_idle == set()
    assert await keys(db) == {"first"}  # committed when the app returned
    assert checked_out(db) == 0


async def test_with_init_app_an_idle_quart_websocket_holds_no_connection(db: Database) -> None:
    app = websocket_app(db, adapter=True, handler_written=anyio.Event())
    client = WebsocketClient(app, websocket_scope(scheme="ws"))
    checked_in = anyio.Event()
    event.listen(db.engine.sync_engine, "checkin", lambda *args: checked_in.set())

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(client.run)
        assert (await client.next_sent())["type"] == "websocket.accept"
        client.send_text("first")
        assert (await client.next_sent())["text"] == "first"
        # The reply went out before the handler's next receive(), which commits.
        with anyio.fail_after(10):
            await checked_in.wait()
        idle_checked_out = checked_out(db)
        committed_while_idle = await keys(db)
        client.disconnect()

    assert idle_checked_out == 0
    assert committed_while_idle == {"first"}
    assert checked_out(db) == 0


async def test_a_failed_websocket_commit_that_quart_propagates_is_answered_and_goes_no_further(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    # With PROPAGATE_EXCEPTIONS (outside debug and testing) Quart re-raises the
    # handler's CommitFailedError out of its ASGI call, since 0.23 inside an
    # ExceptionGroup (from its TaskGroup): the client already has its 1011 and the
    # failure is logged, so the server must not get it as an error of the app's.
    caplog.set_level(logging.ERROR, logger="asgi_sqla")
    app = Quart(__name__)
    app.config["PROPAGATE_EXCEPTIONS"] = True

    @app.websocket("/ws")
    async def handler() -> None:
        while True:
            await websocket.receive()
            await orphan_child(db)  # passes now, fails at COMMIT
            await websocket.send("written")

    app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)  # type: ignore[method-assign]
    init_app(app)
    client = WebsocketClient(app, websocket_scope(scheme="ws"))
    raised: list[BaseException] = []

    async def run() -> None:
        try:
            await client.run()
        except BaseException as exc:  # what the server would get
            raised.append(exc)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run)
        assert (await client.next_sent())["type"] == "websocket.accept"
        client.send_text("orphan")
        assert (await client.next_sent())["text"] == "written"
        client.send_text("next")  # the handler's receive() commits, and fails
        closed = await client.next_sent()
        assert (closed["type"], closed["code"]) == ("websocket.close", 1011)
        client.disconnect()

    assert raised == []
    failures = [r for r in caplog.records if "failed to commit" in r.getMessage()]
    assert len(failures) == 1, caplog.text
    assert checked_out(db) == 0


async def test_quarts_failed_startup_reaches_the_server_once_and_disposes_the_engine(
    db: Database,
) -> None:
    # Quart answers a failing before_serving with lifespan.startup.failed, then goes
    # back to receive() and waits; the server is expected to give up on it.
    app = Quart(__name__)

    @app.before_serving
    async def fail() -> None:
        async with db.scope() as session:
            await session.execute(text("SELECT 1"))
        raise RuntimeError("no config")

    app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)  # type: ignore[method-assign]
    incoming: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[Message] = []
    engine_at_failure: list[object] = []
    answered = anyio.Event()

    async def send(message: Message) -> None:
        engine_at_failure.append(started_engine(db))
        sent.append(message)
        answered.set()

    lifespan: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    incoming.put_nowait({"type": "lifespan.startup"})
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(as_asgi_app(app), lifespan, incoming.get, send)
        with anyio.fail_after(10):
            await answered.wait()
        # Quart is waiting in receive() again; a server cancels it when it exits.
        tasks.cancel_scope.cancel()

    assert sent == [{"type": "lifespan.startup.failed", "message": "no config"}]
    assert engine_at_failure == [None]  # disposed before the failure was forwarded


async def test_a_message_read_ahead_does_not_split_the_work_of_the_one_before_it(
    db: Database,
) -> None:
    # Quart reads websocket messages ahead, in a task of its own: the next message
    # reaches the middleware's receive() while the handler still works on the current
    # one.  With init_app the current message's work stays one transaction: here it
    # rolls back whole when the handler fails after its second half (the middleware
    # used to commit the first half as soon as the next message was read).
    first_half_written, next_read, resume = anyio.Event(), anyio.Event(), anyio.Event()
    app = Quart(__name__)

    @app.websocket("/ws")
    async def handler() -> None:
        while True:
            text = await websocket.receive()
            assert isinstance(text, str)
            await add_key(db, f"{text}-first-half")
            first_half_written.set()
            await resume.wait()
            await add_key(db, f"{text}-second-half")
            raise RuntimeError("the message fails after both halves")

    app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)  # type: ignore[method-assign]
    init_app(app)
    incoming: asyncio.Queue[Message] = asyncio.Queue()
    sent: asyncio.Queue[Message] = asyncio.Queue()

    async def receive() -> Message:
        message = await incoming.get()
        if message.get("text") == "next":
            next_read.set()  # Quart's reader task has taken it, ahead of the handler
        return message

    incoming.put_nowait({"type": "websocket.connect"})
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(as_asgi_app(app), websocket_scope(scheme="ws"), receive, sent.put)
        with anyio.fail_after(10):
            assert (await sent.get())["type"] == "websocket.accept"
            incoming.put_nowait({"type": "websocket.receive", "text": "current"})
            await first_half_written.wait()
            incoming.put_nowait({"type": "websocket.receive", "text": "next"})
            await next_read.wait()
            resume.set()
            assert await sent.get() == {"type": "websocket.close", "code": 1000}
        incoming.put_nowait({"type": "websocket.disconnect", "code": 1001})

    assert await keys(db) == set()
    assert checked_out(db) == 0
