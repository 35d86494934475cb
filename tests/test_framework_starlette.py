"""Starlette: sync endpoints, in-process.

``examples/starlette_app.py`` in real servers is tested with the other examples in
``tests/test_frameworks.py``.  Here small Starlette apps around ``database_url`` show
what a synchronous ``def`` endpoint (run in Starlette's thread pool) meets.
"""

from __future__ import annotations

import anyio
import anyio.from_thread
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_sqla import ConfigurationError, Database, SQLAlchemyMiddleware
from asgi_sqla.types import Message

from _helpers import add_key, call_http, checked_out, keys

pytestmark = pytest.mark.anyio


def sync_app(db: Database) -> Starlette:
    def reads_the_session(request: Request) -> PlainTextResponse:
        db.session  # noqa: B018 - the read is the point
        return PlainTextResponse("unreachable")

    def runs_async_code_on_the_loop(request: Request) -> PlainTextResponse:
        anyio.from_thread.run(add_key, db, request.path_params["key"])
        return PlainTextResponse("stored", status_code=201)

    return Starlette(
        routes=[
            Route("/sync", reads_the_session),
            Route("/from-thread/{key}", runs_async_code_on_the_loop, methods=["POST"]),
        ],
        middleware=[Middleware(SQLAlchemyMiddleware, db)],
    )


async def test_a_sync_endpoint_reading_db_session_gets_a_clear_error_and_a_500_at_once(
    db: Database,
) -> None:
    sent: list[Message] = []

    with anyio.fail_after(10), pytest.raises(ConfigurationError) as raised:
        await call_http(sync_app(db), "/sync", on_send=sent.append)

    message = str(raised.value)
    assert "synchronous `def` endpoint or dependency" in message
    assert "make it `async def`" in message
    # ServerErrorMiddleware answered before re-raising for the server to log.
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 500
    assert checked_out(db) == 0


async def test_a_sync_endpoint_can_run_the_session_on_the_event_loop_with_from_thread(
    db: Database,
) -> None:
    with anyio.fail_after(10):
        recorder = await call_http(sync_app(db), "/from-thread/threaded", method="POST")

    assert recorder.status == 201
    assert await keys(db) == {"threaded"}
    assert checked_out(db) == 0
