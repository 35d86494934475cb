"""A retry route re-runs a request only with its whole body, read and kept.

"Whole" means the final ``http.request`` message (``more_body`` false) was received,
or the request provably has none: HTTP/1.x with neither ``Content-Length`` nor
``Transfer-Encoding`` (RFC 9112, section 6.3), or ``Content-Length: 0``.  Over HTTP/2
and 3 a body needs neither header, so there only the final message proves the end.
A client that disconnected cannot be answered by a re-run either.

The conflicts are real: PostgreSQL raises a serialization failure (SQLSTATE 40001).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from asgi_sqla import Database, SQLAlchemyMiddleware
from asgi_sqla._routes import ReplayableBody
from asgi_sqla.types import ASGIApp, Message, Receive, Scope, Send

from _helpers import ASGIRecorder, add_key, checked_out, create_tables, http_scope, keys

pytestmark = pytest.mark.anyio

#: A serialization failure, as PostgreSQL reports a lost SERIALIZABLE race.
CONFLICT = "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$"


@pytest.fixture
async def db(postgresql_url: str) -> AsyncIterator[Database]:
    database = Database(postgresql_url)
    await create_tables(database)
    try:
        yield database
    finally:
        await database.dispose()


def chunks(*parts: bytes) -> list[Message]:
    """The ``http.request`` messages of a body sent in ``parts``."""
    return [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]


def h2_upload_scope(*headers: tuple[bytes, bytes]) -> Scope:
    """A POST over HTTP/2 (as hypercorn gives it): no Content-Length needed for a body."""
    return http_scope(
        "/upload", method="POST", http_version="2", headers=[(b"host", b"testserver"), *headers]
    )


class Uploads:
    """A handler that writes each chunk of the body as it arrives, in its own row.

    Its first attempt hits a serialization failure after the first chunk, like a
    handler that lost a race with a concurrent request halfway through an upload.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.attempts = 0

    async def write(self, chunk: bytes) -> None:
        await add_key(self.db, chunk.decode())
        if self.attempts == 1:
            await self.db.session.execute(text(CONFLICT))

    def asgi(self) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            self.attempts += 1
            more_body = True
            while more_body:
                message = await receive()
                more_body = message.get("more_body", False)
                await self.write(message["body"])
            await send({"type": "http.response.start", "status": 201, "headers": []})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        return app

    def starlette(self) -> ASGIApp:
        async def upload(request: Request) -> Response:
            self.attempts += 1
            async for chunk in request.stream():
                if chunk:
                    await self.write(chunk)
            return Response(status_code=201)

        # Starlette's ServerErrorMiddleware answers 500 for the conflict, then re-raises.
        return Starlette(routes=[Route("/upload", upload, methods=["POST"])])


@pytest.mark.parametrize("framework", ["asgi", "starlette"])
async def test_an_http2_body_read_halfway_is_not_rerun_as_if_its_first_chunk_were_all(
    db: Database, framework: str
) -> None:
    uploads = Uploads(db)
    app = SQLAlchemyMiddleware(getattr(uploads, framework)(), db, retry=["/upload"])
    recorder = ASGIRecorder(chunks(b"first half", b"second half"))

    with pytest.raises(DBAPIError):
        await recorder(app, h2_upload_scope())

    assert uploads.attempts == 1
    assert await keys(db) == set()  # no half upload committed
    # The client hears of the failure; never a 201 for half its upload.
    assert [m.get("status") for m in recorder.sent if m["type"] == "http.response.start"] == (
        [500] if framework == "starlette" else []
    )
    assert checked_out(db) == 0


async def test_an_http2_body_read_to_its_end_is_rerun_with_all_of_it(db: Database) -> None:
    attempts: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        more_body = True
        while more_body:
            message = await receive()
            body += message["body"]
            more_body = message.get("more_body", False)
        attempts.append(body)
        await add_key(db, body.decode())
        if len(attempts) == 1:
            await db.session.execute(text(CONFLICT))
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    recorder = ASGIRecorder(chunks(b"first half, ", b"second half"))

    await recorder(SQLAlchemyMiddleware(app, db, retry=["/upload"]), h2_upload_scope())

    assert recorder.status == 201
    assert attempts == [b"first half, second half"] * 2
    assert await keys(db) == {"first half, second half"}


@pytest.mark.parametrize(
    ("http_version", "method", "headers"),
    [
        pytest.param("1.1", "GET", [], id="http1.1-get-without-body-headers"),
        pytest.param("1.0", "GET", [], id="http1.0-get-without-body-headers"),
        pytest.param("1.1", "POST", [(b"content-length", b"0")], id="http1.1-content-length-0"),
        pytest.param("2", "POST", [(b"content-length", b"0")], id="http2-content-length-0"),
    ],
)
async def test_a_request_that_provably_has_no_body_is_rerun_though_the_app_never_read_it(
    db: Database, http_version: str, method: str, headers: list[tuple[bytes, bytes]]
) -> None:
    attempts: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        attempts.append(1)
        await add_key(db, f"attempt {len(attempts)}")
        if len(attempts) == 1:
            await db.session.execute(text(CONFLICT))
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    scope = http_scope("/", method=method, http_version=http_version)
    scope["headers"] = [*scope["headers"], *headers]
    recorder = ASGIRecorder(chunks(b""))

    await recorder(SQLAlchemyMiddleware(app, db, retry=["/"]), scope)

    assert recorder.status == 201
    assert len(attempts) == 2
    assert await keys(db) == {"attempt 2"}


async def test_a_request_whose_client_disconnected_is_not_rerun(db: Database) -> None:
    attempts: list[int] = []
    recorder = ASGIRecorder(chunks(b"whole body"))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        attempts.append(1)
        await receive()
        recorder.disconnect()
        assert (await receive())["type"] == "http.disconnect"
        await add_key(db, "written")
        await db.session.execute(text(CONFLICT))

    with pytest.raises(DBAPIError):
        await recorder(SQLAlchemyMiddleware(app, db, retry=["/"]), http_scope("/", "POST"))

    assert len(attempts) == 1
    assert await keys(db) == set()


async def test_a_rerun_request_whose_client_disconnected_is_not_rerun_again(
    db: Database,
) -> None:
    attempts: list[int] = []
    recorder = ASGIRecorder(chunks(b"whole body"))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        attempts.append(1)
        assert (await receive())["body"] == b"whole body"
        if len(attempts) == 2:  # the re-run: the client gives up meanwhile
            recorder.disconnect()
            assert (await receive())["type"] == "http.disconnect"
        await db.session.execute(text(CONFLICT))

    wrapped = SQLAlchemyMiddleware(app, db, retry=["/"], retry_attempts=3)

    with pytest.raises(DBAPIError):
        await recorder(wrapped, http_scope("/", "POST"))

    assert len(attempts) == 2


@pytest.mark.parametrize(
    ("http_version", "headers", "whole"),
    [
        pytest.param("1.1", [], True, id="http1.1-no-headers"),
        pytest.param("1.0", [], True, id="http1.0-no-headers"),
        pytest.param("1.1", [(b"content-length", b"0")], True, id="http1.1-length-0"),
        pytest.param("2", [(b"content-length", b"0")], True, id="http2-length-0"),
        pytest.param("3", [(b"Content-Length", b" 0 ")], True, id="http3-length-0"),
        pytest.param("2", [], False, id="http2-no-headers"),
        pytest.param("3", [], False, id="http3-no-headers"),
        pytest.param("1.1", [(b"content-length", b"12")], False, id="http1.1-length-12"),
        pytest.param("1.1", [(b"transfer-encoding", b"chunked")], False, id="http1.1-chunked"),
        pytest.param(
            "1.1",
            [(b"content-length", b"0"), (b"transfer-encoding", b"chunked")],
            False,
            id="http1.1-chunked-overrides-length-0",
        ),
        pytest.param(None, [], False, id="no-http-version"),
    ],
)
def test_a_body_counts_as_whole_before_any_read_only_when_the_request_provably_has_none(
    http_version: str | None, headers: list[tuple[bytes, bytes]], whole: bool
) -> None:
    scope = http_scope("/", "POST", http_version=http_version, headers=headers)
    if http_version is None:
        del scope["http_version"]

    async def receive() -> Message:
        raise AssertionError("not read")

    assert ReplayableBody(scope, receive, limit=1024).replayable is whole


async def test_a_body_over_the_limit_or_cut_by_a_disconnect_cannot_be_replayed() -> None:
    messages = [*chunks(b"12345", b"678"), {"type": "http.disconnect"}]

    async def receive() -> Message:
        return messages.pop(0)

    scope = http_scope("/", "POST", http_version="2")
    within_limit = ReplayableBody(scope, receive, limit=8)
    await within_limit.receive()
    assert not within_limit.replayable  # more body to come
    await within_limit.receive()
    assert within_limit.replayable
    await within_limit.receive()  # the client went away: nobody to answer a re-run
    assert not within_limit.replayable

    messages[:] = chunks(b"12345", b"678")
    over_limit = ReplayableBody(scope, receive, limit=7)
    await over_limit.receive()
    await over_limit.receive()
    assert not over_limit.replayable
