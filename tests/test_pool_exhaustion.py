"""A request that cannot get a connection answers 503 with Retry-After, not 500.

The pool is one connection with no overflow and a short timeout; a first request holds
the connection while a second one asks for it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_sqla import ConfigurationError, Database, SQLAlchemyMiddleware
from asgi_sqla.types import Receive, Scope, Send

from _helpers import ASGIRecorder, call_http, checked_out, plain_response

pytestmark = pytest.mark.anyio


@pytest.fixture
def db_options() -> dict[str, Any]:
    """One connection, no overflow and a short wait: the pool runs out at once."""
    return {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2}


async def while_the_pool_is_held(db: Database, request: Callable[[], Awaitable[None]]) -> None:
    """Run ``request()`` while another request holds the pool's only connection."""
    holding = anyio.Event()
    release = anyio.Event()

    async def holder(scope: Scope, receive: Receive, send: Send) -> None:
        await db.session.execute(text("SELECT 1"))
        holding.set()
        await release.wait()
        await plain_response(send, 200)

    async with anyio.create_task_group() as group:
        group.start_soon(call_http, SQLAlchemyMiddleware(holder, db))
        await holding.wait()
        try:
            await request()
        finally:
            release.set()
    assert checked_out(db) == 0


def retry_after(recorder: ASGIRecorder) -> list[bytes]:
    start = next(m for m in recorder.sent if m["type"] == "http.response.start")
    return [v for k, v in start["headers"] if k.lower() == b"retry-after"]


async def test_a_pool_timeout_that_reaches_the_middleware_answers_503_with_retry_after(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.session.execute(text("SELECT 2"))
        await plain_response(send, 200)

    recorders: list[ASGIRecorder] = []

    async def request() -> None:
        recorders.append(await call_http(SQLAlchemyMiddleware(app, db, retry_after=3)))

    with caplog.at_level(logging.WARNING, logger="asgi_sqla"):
        await while_the_pool_is_held(db, request)

    [recorder] = recorders
    assert recorder.status == 503
    assert retry_after(recorder) == [b"3"]
    assert b"Retry shortly" in recorder.body
    assert recorder.types() == ["http.response.start", "http.response.body"]
    assert any("503" in r.getMessage() for r in caplog.records if r.name == "asgi_sqla")


async def test_a_pool_timeout_in_a_starlette_endpoint_answers_503(db: Database) -> None:
    async def endpoint(request: Request) -> PlainTextResponse:
        await db.session.execute(text("SELECT 2"))
        return PlainTextResponse("ok")

    app = SQLAlchemyMiddleware(Starlette(routes=[Route("/", endpoint)]), db)
    recorders: list[ASGIRecorder] = []

    async def request() -> None:
        recorders.append(await call_http(app))

    await while_the_pool_is_held(db, request)

    assert recorders[0].status == 503
    assert retry_after(recorders[0]) == [b"1"]


async def test_a_pool_timeout_the_framework_turned_into_a_500_becomes_a_503(
    db: Database,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await db.session.execute(text("SELECT 2"))
        except PoolTimeoutError:
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-length", b"5"), (b"retry-after", b"99")],
                }
            )
            await send({"type": "http.response.body", "body": b"oops!"})
            return
        await plain_response(send, 200)

    recorders: list[ASGIRecorder] = []

    async def request() -> None:
        recorders.append(await call_http(SQLAlchemyMiddleware(app, db)))

    await while_the_pool_is_held(db, request)

    [recorder] = recorders
    assert recorder.status == 503
    assert retry_after(recorder) == [b"1"]
    assert recorder.body == b"oops!"


async def test_a_500_that_is_not_a_pool_timeout_stays_a_500(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.session.execute(text("SELECT 2"))
        await plain_response(send, 500, b"broken")

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 500
    assert retry_after(recorder) == []


async def test_a_pool_timeout_after_the_response_started_is_not_rewritten(
    db: Database,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await db.session.execute(text("SELECT 2"))  # the pool is held: times out
        await send({"type": "http.response.body", "body": b"never"})

    async def request() -> None:
        with pytest.raises(PoolTimeoutError):
            await call_http(SQLAlchemyMiddleware(app, db))

    await while_the_pool_is_held(db, request)


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_retry_after_must_be_a_whole_number_of_seconds(value: object) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError

    with pytest.raises(ConfigurationError, match="retry_after"):
        SQLAlchemyMiddleware(app, Database("sqlite+aiosqlite://"), retry_after=value)  # type: ignore[arg-type]
