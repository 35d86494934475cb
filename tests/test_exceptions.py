"""Promise 4: an exception before the response starts rolls back and propagates unchanged."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_sqla import Database, SQLAlchemyMiddleware
from asgi_sqla.types import Receive, Scope, Send

from _helpers import ASGIRecorder, add_key, checked_out, http_scope, keys

pytestmark = pytest.mark.anyio


class AppError(Exception):
    """An application error the middleware knows nothing about."""


def new_recorder() -> ASGIRecorder:
    return ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])


async def test_an_exception_before_the_start_rolls_back_and_propagates_unchanged(
    db: Database,
) -> None:
    error = AppError("boom")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "written")
        raise error

    recorder = new_recorder()
    with pytest.raises(AppError) as raised:
        await recorder(SQLAlchemyMiddleware(app, db), http_scope())

    assert raised.value is error
    assert raised.value.args == ("boom",)
    assert raised.value.__cause__ is None
    assert raised.value.__context__ is None
    assert recorder.sent == []
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_an_exception_with_an_unused_session_propagates_unchanged(db: Database) -> None:
    error = KeyError("missing")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        db.session  # noqa: B018 -- read, never executed
        raise error

    with pytest.raises(KeyError) as raised:
        await new_recorder()(SQLAlchemyMiddleware(app, db), http_scope())

    assert raised.value is error
    assert raised.value.__context__ is None
    assert checked_out(db) == 0


async def test_an_exception_without_any_session_propagates_unchanged(db: Database) -> None:
    error = AppError("no database involved")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise error

    with pytest.raises(AppError) as raised:
        await new_recorder()(SQLAlchemyMiddleware(app, db), http_scope())

    assert raised.value is error
    assert checked_out(db) == 0


async def test_an_exception_after_the_start_rolls_back_the_post_start_session(
    db: Database,
) -> None:
    error = AppError("failed while streaming")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "before the start")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await add_key(db, "after the start")
        raise error

    recorder = new_recorder()
    with pytest.raises(AppError) as raised:
        await recorder(SQLAlchemyMiddleware(app, db), http_scope())

    assert raised.value is error
    assert recorder.types() == ["http.response.start"]
    assert await keys(db) == {"before the start"}
    assert checked_out(db) == 0


async def test_an_app_that_returns_without_starting_a_response_rolls_back(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "never answered")

    recorder = new_recorder()
    await recorder(SQLAlchemyMiddleware(app, db), http_scope())

    assert recorder.sent == []
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_an_app_that_sends_only_early_hints_and_returns_rolls_back(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "never answered")
        await send({"type": "http.response.early_hint", "links": [b"</style.css>; rel=preload"]})

    recorder = new_recorder()
    await recorder(SQLAlchemyMiddleware(app, db), http_scope())

    assert recorder.types() == ["http.response.early_hint"]
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_an_exception_in_a_starlette_endpoint_rolls_back_and_reaches_the_server(
    db: Database,
) -> None:
    error = AppError("endpoint failed")

    async def endpoint(request: Request) -> PlainTextResponse:
        await add_key(db, "written")
        raise error

    app = Starlette(
        routes=[Route("/", endpoint)], middleware=[Middleware(SQLAlchemyMiddleware, db)]
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        with pytest.raises(AppError) as raised:
            await client.get("/")

    assert raised.value is error
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_a_starlette_endpoint_error_answered_with_500_is_rolled_back(
    db: Database,
) -> None:
    async def endpoint(request: Request) -> PlainTextResponse:
        await add_key(db, "written")
        raise AppError("endpoint failed")

    app = Starlette(
        routes=[Route("/", endpoint)], middleware=[Middleware(SQLAlchemyMiddleware, db)]
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/")

    assert response.status_code == 500
    assert await keys(db) == set()
    assert checked_out(db) == 0
