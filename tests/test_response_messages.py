"""Every other ASGI message the middleware meets passes through untouched.

Messages before the start (``early_hint``, ``debug``, ``push``) do not end the
transaction; trailers, ``pathsend`` and ``zerocopysend`` after it are forwarded as
they are; the request body is never read by the middleware; unknown scope types are
not looked at.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Route

from asgi_sqla import SCOPE_KEY, Database, SQLAlchemyMiddleware
from asgi_sqla.types import Message, Receive, Scope, Send

from _helpers import (
    ASGIRecorder,
    add_key,
    call_http,
    checked_out,
    create_tables,
    http_scope,
    keys,
    plain_response,
    release,
)

pytestmark = pytest.mark.anyio

START = "http.response.start"
BODY = "http.response.body"


async def open_database(url: str) -> Database:
    database = Database(url)
    await create_tables(database)
    return database


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """SQLite: these are protocol tests, the backend does not matter."""
    database = await open_database(f"sqlite+aiosqlite:///{tmp_path / 'messages.db'}")
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
async def any_db(database_url: str) -> AsyncIterator[Database]:
    database = await open_database(database_url)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.mark.parametrize(
    "message",
    [
        {"type": "http.response.early_hint", "links": [b"</app.css>; rel=preload; as=style"]},
        {"type": "http.response.debug", "info": {"template": "index.html"}},
        {"type": "http.response.push", "path": "/app.js", "headers": []},
    ],
    ids=["early_hint", "debug", "push"],
)
async def test_a_message_before_the_start_passes_through_without_ending_the_transaction(
    any_db: Database, message: Message
) -> None:
    db = any_db
    original = dict(message)
    observed: list[tuple[str, int, set[str]]] = []

    async def on_send(sent: Message) -> None:
        pool = checked_out(db)
        observed.append((sent["type"], pool, await keys(db)))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "written")
        await send(message)
        await add_key(db, "after the hint")
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db), on_send=on_send)

    assert recorder.sent[0] is message
    assert message == original
    assert recorder.types() == [message["type"], START, BODY]
    assert observed == [
        (message["type"], 1, set()),
        (START, 0, {"written", "after the hint"}),
        (BODY, 0, {"written", "after the hint"}),
    ]


async def test_an_early_hint_does_not_decide_the_outcome(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "written")
        await send({"type": "http.response.early_hint", "links": [b"</a.css>; rel=preload"]})
        await plain_response(send, 400)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 400
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_trailers_pass_through(db: Database) -> None:
    start: Message = {"type": START, "status": 200, "headers": [], "trailers": True}
    body: Message = {"type": BODY, "body": b"data", "more_body": False}
    trailers: Message = {
        "type": "http.response.trailers",
        "headers": [(b"x-checksum", b"abc")],
        "more_trailers": False,
    }
    committed_at_start: list[set[str]] = []

    async def on_send(message: Message) -> None:
        if message["type"] == START:
            committed_at_start.append(await keys(db))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "written")
        await send(start)
        await send(body)
        await send(trailers)

    recorder = await call_http(SQLAlchemyMiddleware(app, db), on_send=on_send)

    assert len(recorder.sent) == 3
    assert recorder.sent[0] is start
    assert recorder.sent[1] is body
    assert recorder.sent[2] is trailers
    assert start["trailers"] is True
    assert committed_at_start == [{"written"}]
    assert checked_out(db) == 0


@pytest.mark.parametrize("kind", ["pathsend", "zerocopysend"])
async def test_file_messages_after_the_start_pass_through(
    db: Database, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "file.txt"
    path.write_bytes(b"file content")
    start: Message = {"type": START, "status": 200, "headers": []}
    pool_at_file: list[int] = []

    def on_send(message: Message) -> None:
        if message["type"] == f"http.response.{kind}":
            pool_at_file.append(checked_out(db))

    with path.open("rb") as file:
        message: Message
        if kind == "pathsend":
            message = {"type": "http.response.pathsend", "path": str(path)}
        else:
            message = {
                "type": "http.response.zerocopysend",
                "file": file.fileno(),
                "offset": 0,
                "count": 12,
                "more_body": False,
            }
        original = dict(message)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, kind)
            await send(start)
            await send(message)

        scope = http_scope(extensions={f"http.response.{kind}": {}})
        recorder = ASGIRecorder(
            [{"type": "http.request", "body": b"", "more_body": False}], on_send=on_send
        )
        await recorder(SQLAlchemyMiddleware(app, db), scope)

    assert len(recorder.sent) == 2
    assert recorder.sent[0] is start
    assert recorder.sent[1] is message
    assert message == original
    assert pool_at_file == [0]
    assert await keys(db) == {kind}


async def test_a_starlette_file_response_is_sent_after_the_commit(
    db: Database, tmp_path: Path
) -> None:
    path = tmp_path / "report.csv"
    path.write_text("a,b\n1,2\n")
    committed_at_start: list[tuple[int, set[str]]] = []

    async def on_send(message: Message) -> None:
        if message["type"] == START:
            pool = checked_out(db)
            committed_at_start.append((pool, await keys(db)))

    async def endpoint(request: Request) -> FileResponse:
        await add_key(db, "report generated")
        return FileResponse(path)

    app = Starlette(
        routes=[Route("/report", endpoint)], middleware=[Middleware(SQLAlchemyMiddleware, db)]
    )
    scope = http_scope("/report", extensions={"http.response.pathsend": {}})
    recorder = ASGIRecorder(
        [{"type": "http.request", "body": b"", "more_body": False}], on_send=on_send
    )
    await recorder(app, scope)

    assert recorder.status == 200
    # Starlette's FileResponse sends the path when the server offers the extension since
    # 0.47, and reads the file into body messages before.
    if release("starlette") >= (0, 47):
        assert recorder.types() == [START, "http.response.pathsend"]
        assert recorder.sent[1]["path"] == str(path)
    else:
        assert recorder.types()[0] == START
        assert recorder.body == b"a,b\n1,2\n"
    assert committed_at_start == [(0, {"report generated"})]
    assert checked_out(db) == 0


@pytest.mark.parametrize("touch_database", [False, True])
async def test_the_middleware_never_calls_receive(db: Database, touch_database: bool) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if touch_database:
            await add_key(db, "written")
        await plain_response(send, 200, b"ok")

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.receive_calls == 0
    assert recorder.status == 200


async def test_the_app_reads_the_request_body_from_the_server_itself(db: Database) -> None:
    bodies: list[Message] = []
    first: Message = {"type": "http.request", "body": b"part 1 ", "more_body": True}
    second: Message = {"type": "http.request", "body": b"part 2", "more_body": False}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        bodies.append(await receive())
        await add_key(db, "written")
        bodies.append(await receive())
        await plain_response(send, 200)

    recorder = ASGIRecorder([first, second])
    await recorder(SQLAlchemyMiddleware(app, db), http_scope(method="POST"))

    assert recorder.receive_calls == 2
    assert bodies[0] is first
    assert bodies[1] is second
    assert await keys(db) == {"written"}


async def test_an_unknown_scope_type_passes_through_untouched(db: Database) -> None:
    calls: list[tuple[Scope, Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append((scope, receive, send))
        await send({"type": "custom.reply"})

    async def receive() -> Message:
        raise AssertionError("the middleware must not receive")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "custom", "asgi": {"version": "3.0"}, "data": [1, 2]}
    original = {"type": "custom", "asgi": {"version": "3.0"}, "data": [1, 2]}

    await SQLAlchemyMiddleware(app, db)(scope, receive, send)

    assert len(calls) == 1
    assert calls[0][0] is scope
    assert calls[0][1] is receive
    assert calls[0][2] is send
    assert scope == original
    assert SCOPE_KEY not in scope
    assert sent == [{"type": "custom.reply"}]
