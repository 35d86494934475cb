"""Promise 2: the status line never lies.

The transaction commits or rolls back (by ``commit_on(status)``) before
``http.response.start`` is forwarded, and a commit that fails turns the response into a
500: logged, with nothing of the app's response and nothing after it going out.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import anyio
import httpx
import psycopg
import pytest
from psycopg.rows import TupleRow
from sqlalchemy import exc, func, select, text
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from asgi_sqla import CommitFailedError, Database, SQLAlchemyMiddleware
from asgi_sqla.types import Message, Receive, Scope, Send

from _helpers import (
    ASGIRecorder,
    add_key,
    call_http,
    checked_out,
    http_scope,
    items,
    keys,
    open_database,
    orphan_child,
    plain_response,
)

pytestmark = pytest.mark.anyio


def assert_valid_http_response(messages: Sequence[Message]) -> None:
    """Exactly one start, then body messages only, the last with more_body False."""
    types = [m["type"] for m in messages]
    assert types.count("http.response.start") == 1, types
    assert types[0] == "http.response.start", types
    assert all(t == "http.response.body" for t in types[1:]), types
    assert len(types) >= 2, types
    assert messages[-1].get("more_body", False) is False, messages[-1]
    assert all(m.get("more_body", False) is True for m in messages[1:-1]), messages


def commit_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "asgi_sqla" and r.levelno >= logging.ERROR]


# -- the default policy -------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204, 302, 399])
async def test_a_response_below_400_commits_the_request(db: Database, status: int) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "written")
        await plain_response(send, status)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == status
    assert_valid_http_response(recorder.sent)
    assert await keys(db) == {"written"}
    assert checked_out(db) == 0


@pytest.mark.parametrize("status", [400, 404, 422, 500, 503])
async def test_a_response_of_400_or_more_rolls_the_request_back(db: Database, status: int) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "written")
        await plain_response(send, status, b"error")

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == status
    assert recorder.body == b"error"
    assert_valid_http_response(recorder.sent)
    assert await keys(db) == set()
    assert checked_out(db) == 0


# -- custom policies ----------------------------------------------------------------------


@pytest.mark.parametrize(("status", "committed"), [(404, True), (499, True), (500, False)])
async def test_a_custom_commit_on_decides_from_the_status(
    database_url: str, status: int, committed: bool
) -> None:
    asked: list[int] = []

    def below_500(code: int) -> bool:
        asked.append(code)
        return code < 500

    db = await open_database(database_url, commit_on=below_500)
    try:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, "written")
            await plain_response(send, status)

        recorder = await call_http(SQLAlchemyMiddleware(app, db))

        assert recorder.status == status
        assert asked == [status]
        assert await keys(db) == ({"written"} if committed else set())
        assert checked_out(db) == 0
    finally:
        await db.dispose()


async def test_a_custom_commit_on_can_refuse_a_200(database_url: str) -> None:
    db = await open_database(database_url, commit_on=lambda code: code == 201)
    try:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, scope["path"].strip("/"))
            await plain_response(send, 201 if scope["path"] == "/created" else 200)

        middleware = SQLAlchemyMiddleware(app, db)
        assert (await call_http(middleware, "/ok")).status == 200
        assert (await call_http(middleware, "/created")).status == 201

        assert await keys(db) == {"created"}
        assert checked_out(db) == 0
    finally:
        await db.dispose()


async def test_commit_on_is_not_consulted_when_no_session_was_opened(database_url: str) -> None:
    asked: list[int] = []

    def commit_on(code: int) -> bool:
        asked.append(code)
        return True

    db = await open_database(database_url, commit_on=commit_on)
    try:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await plain_response(send, 200)

        assert (await call_http(SQLAlchemyMiddleware(app, db))).status == 200
        assert asked == []
    finally:
        await db.dispose()


async def test_commit_on_none_commits_nothing_the_app_did_not_commit(database_url: str) -> None:
    db = await open_database(database_url, commit_on=None)
    try:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, "uncommitted")
            await plain_response(send, 200)

        recorder = await call_http(SQLAlchemyMiddleware(app, db))

        assert recorder.status == 200
        assert await keys(db) == set()
        assert checked_out(db) == 0
    finally:
        await db.dispose()


async def test_commit_on_none_keeps_what_the_app_committed_and_drops_the_rest(
    database_url: str,
) -> None:
    db = await open_database(database_url, commit_on=None)
    try:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, "explicit")
            await db.commit()
            await add_key(db, "after the commit")
            await plain_response(send, 200)

        recorder = await call_http(SQLAlchemyMiddleware(app, db))

        assert recorder.status == 200
        assert await keys(db) == {"explicit"}
        assert checked_out(db) == 0
    finally:
        await db.dispose()


# -- a commit that fails ------------------------------------------------------------------


async def test_a_failed_commit_sends_500_instead_of_200(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app_errors: list[BaseException] = []
    after_body: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "doomed")
        await orphan_child(db)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"all good", "more_body": False})
        except BaseException as error:
            app_errors.append(error)
            raise
        after_body.append("background step ran")

    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 500
    assert recorder.body == b"Internal Server Error"
    assert_valid_http_response(recorder.sent)
    assert len(recorder.sent) == 2
    assert b"all good" not in recorder.body
    assert after_body == []
    assert len(app_errors) == 1
    assert isinstance(app_errors[0], CommitFailedError)
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_an_error_status_with_a_doomed_write_keeps_its_status(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "doomed")
        await orphan_child(db)
        await plain_response(send, 422, b"invalid")

    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 422
    assert recorder.body == b"invalid"
    assert commit_errors(caplog) == []
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_a_failed_commit_is_logged_as_an_error_with_its_traceback(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await orphan_child(db)
        await plain_response(send, 200)

    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        await call_http(SQLAlchemyMiddleware(app, db))

    records = commit_errors(caplog)
    assert len(records) == 1, records
    record = records[0]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], exc.IntegrityError)
    assert record.exc_info[2] is not None


async def test_an_app_that_ignores_the_failed_commit_cannot_send_anything_more(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    errors: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await orphan_child(db)
        messages: list[Message] = [
            {"type": "http.response.start", "status": 200, "headers": []},
            {"type": "http.response.body", "body": b"part one", "more_body": True},
            {"type": "http.response.body", "body": b"part two", "more_body": False},
        ]
        for message in messages:
            try:
                await send(message)
            except CommitFailedError as error:
                errors.append(error)

    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 500
    assert len(recorder.sent) == 2
    assert_valid_http_response(recorder.sent)
    assert b"part" not in recorder.body
    assert len(errors) == 3
    assert all(isinstance(error, CommitFailedError) for error in errors)
    assert checked_out(db) == 0


async def test_a_failed_commit_does_not_reach_the_server_as_an_exception(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await orphan_child(db)
        try:
            await plain_response(send, 200)
        except CommitFailedError as error:
            raise RuntimeError("the framework re-wrapped it") from error

    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        await recorder(SQLAlchemyMiddleware(app, db), http_scope())  # must not raise

    assert recorder.status == 500
    assert_valid_http_response(recorder.sent)
    assert len(commit_errors(caplog)) == 1


async def test_a_failed_commit_rolls_back_every_write_of_the_request(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "one")
        await db.session.execute(text("INSERT INTO parents (id) VALUES (1)"))
        await orphan_child(db)
        await add_key(db, "two")
        await plain_response(send, 201)

    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 500
    assert await keys(db) == set()
    async with db.engine.connect() as connection:
        parents = await connection.scalar(text("SELECT count(*) FROM parents"))
    assert parents == 0
    assert checked_out(db) == 0


async def test_the_next_request_does_not_see_the_writes_of_a_failed_commit(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[list[str]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/write":
            await add_key(db, "doomed")
            await orphan_child(db)
        else:
            seen.append(list((await db.session.scalars(select(items.c.key))).all()))
            await add_key(db, "next")
        await plain_response(send, 200)

    middleware = SQLAlchemyMiddleware(app, db)
    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        assert (await call_http(middleware, "/write")).status == 500
    assert (await call_http(middleware, "/read")).status == 200

    assert seen == [[]]
    assert await keys(db) == {"next"}
    assert checked_out(db) == 0


async def test_a_violated_deferred_unique_constraint_on_postgresql_sends_500(
    postgresql_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = await open_database(postgresql_url)
    try:
        async with db.engine.begin() as connection:
            await connection.execute(
                text(
                    "CREATE TABLE codes (code INTEGER, "
                    "CONSTRAINT codes_unique UNIQUE (code) DEFERRABLE INITIALLY DEFERRED)"
                )
            )
        reached: list[str] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, "doomed")
            await db.session.execute(text("INSERT INTO codes (code) VALUES (7)"))
            await db.session.execute(text("INSERT INTO codes (code) VALUES (7)"))
            reached.append("both inserts succeeded")
            await plain_response(send, 200, b"ok")
            reached.append("after the body")

        with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
            recorder = await call_http(SQLAlchemyMiddleware(app, db))

        assert reached == ["both inserts succeeded"]
        assert recorder.status == 500
        assert_valid_http_response(recorder.sent)
        records = commit_errors(caplog)
        assert len(records) == 1
        assert records[0].exc_info is not None
        assert isinstance(records[0].exc_info[1], exc.IntegrityError)
        assert "codes_unique" in str(records[0].exc_info[1])
        assert await keys(db) == set()
        assert checked_out(db) == 0
    finally:
        await db.dispose()


async def test_a_connection_dropped_before_the_commit_sends_503_with_retry_after(
    postgresql_url: str,
    pg_admin: psycopg.Connection[TupleRow],
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = await open_database(postgresql_url)
    try:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, "lost")
            pid = await db.session.scalar(text("SELECT pg_backend_pid()"))
            pg_admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await plain_response(send, 200, b"saved")

        with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
            recorder = await call_http(SQLAlchemyMiddleware(app, db))

        # The database went away: unavailable, and still no claim of success.
        assert recorder.status == 503
        [start] = [m for m in recorder.sent if m["type"] == "http.response.start"]
        assert (b"retry-after", b"1") in start["headers"]
        assert_valid_http_response(recorder.sent)
        assert b"saved" not in recorder.body
        records = commit_errors(caplog)
        assert len(records) == 1
        assert records[0].exc_info is not None
        assert isinstance(records[0].exc_info[1], exc.DBAPIError)
        assert await keys(db) == set()
        assert checked_out(db) == 0
    finally:
        await db.dispose()


async def test_a_serialization_failure_at_commit_sends_500_to_the_second_committer(
    postgresql_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = await open_database(postgresql_url, isolation_level="SERIALIZABLE")
    try:
        inserted = {"a": anyio.Event(), "b": anyio.Event()}
        a_committed = anyio.Event()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            name = scope["path"].strip("/")
            other = "b" if name == "a" else "a"
            # Write skew: each reads what the other writes.
            await db.session.scalar(select(func.count()).select_from(items))
            await add_key(db, name)
            inserted[name].set()
            await inserted[other].wait()
            if name == "b":
                await a_committed.wait()
            await plain_response(send, 200, name.encode())

        def on_send_a(message: Message) -> None:
            if message["type"] == "http.response.start":
                a_committed.set()

        middleware = SQLAlchemyMiddleware(app, db)
        results: dict[str, ASGIRecorder] = {}

        async def request(name: str) -> None:
            results[name] = await call_http(
                middleware, f"/{name}", on_send=on_send_a if name == "a" else None
            )

        with caplog.at_level(logging.ERROR, logger="asgi_sqla"), anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(request, "a")
                tg.start_soon(request, "b")

        assert results["a"].status == 200
        assert results["a"].body == b"a"
        assert results["b"].status == 500
        assert_valid_http_response(results["b"].sent)
        records = commit_errors(caplog)
        assert len(records) == 1
        assert records[0].exc_info is not None
        assert "could not serialize access" in str(records[0].exc_info[1])
        assert await keys(db) == {"a"}
        assert checked_out(db) == 0
    finally:
        await db.dispose()


# -- through Starlette --------------------------------------------------------------------


def starlette_app(db: Database, background: list[str]) -> Starlette:
    async def ok(request: Request) -> PlainTextResponse:
        await add_key(db, "ok")
        return PlainTextResponse("ok")

    async def bad(request: Request) -> PlainTextResponse:
        await add_key(db, "bad")
        raise HTTPException(400, "bad input")

    async def doomed(request: Request) -> PlainTextResponse:
        await add_key(db, "doomed")
        await orphan_child(db)

        async def after() -> None:
            background.append("ran")

        return PlainTextResponse("ok", background=BackgroundTask(after))

    return Starlette(
        routes=[Route("/ok", ok), Route("/bad", bad), Route("/doomed", doomed)],
        middleware=[Middleware(SQLAlchemyMiddleware, db)],
    )


async def get(app: Starlette, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.get(path)


async def test_starlette_200_is_committed(db: Database) -> None:
    response = await get(starlette_app(db, []), "/ok")

    assert response.status_code == 200
    assert response.text == "ok"
    assert await keys(db) == {"ok"}
    assert checked_out(db) == 0


async def test_starlette_http_exception_400_is_rolled_back(db: Database) -> None:
    response = await get(starlette_app(db, []), "/bad")

    assert response.status_code == 400
    assert response.text == "bad input"
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_starlette_failed_commit_sends_500_and_skips_the_background_task(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    background: list[str] = []

    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        response = await get(starlette_app(db, background), "/doomed")

    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert background == []
    assert len(commit_errors(caplog)) == 1
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_starlette_background_task_runs_after_a_successful_commit(db: Database) -> None:
    seen: list[set[str]] = []

    async def after() -> None:
        seen.append(await keys(db))

    async def endpoint(request: Request) -> PlainTextResponse:
        await add_key(db, "first")
        return PlainTextResponse("ok", background=BackgroundTask(after))

    app = Starlette(
        routes=[Route("/", endpoint)], middleware=[Middleware(SQLAlchemyMiddleware, db)]
    )
    response = await get(app, "/")

    assert response.status_code == 200
    assert seen == [{"first"}]


async def test_starlette_failed_commit_never_starts_a_streaming_body(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    produced: list[str] = []

    async def body() -> AsyncIterator[bytes]:
        produced.append("first chunk")
        yield b"first chunk"

    async def endpoint(request: Request) -> StreamingResponse:
        await orphan_child(db)
        return StreamingResponse(body())

    app = Starlette(
        routes=[Route("/", endpoint)], middleware=[Middleware(SQLAlchemyMiddleware, db)]
    )
    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        response = await get(app, "/")

    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert produced == []
    assert checked_out(db) == 0
