"""What a request did to the database: ``db.stats``, Server-Timing, warnings, logs, pool.

Statistics are off by default and cost nothing then: no engine event is registered.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_sqla import Database, PoolStatus, RequestStats, SQLAlchemyMiddleware
from asgi_sqla.types import ASGIApp, Receive, Scope, Send

from _helpers import (
    ASGIRecorder,
    add_key,
    call_http,
    orphan_child,
    plain_response,
    release,
)

pytestmark = pytest.mark.anyio

PASSWORD_LIKE = "s3cret-parameter"


@pytest.fixture
def db_options() -> dict[str, Any]:
    return {"stats": True}


def header(recorder: ASGIRecorder, name: bytes) -> list[bytes]:
    start = next(m for m in recorder.sent if m["type"] == "http.response.start")
    return [v for k, v in start["headers"] if k.lower() == name]


def three_statements(db: Database, status: int = 200) -> Starlette:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for _ in range(3):
            await db.session.execute(text("SELECT 1"))
        await plain_response(send, status)

    return app  # type: ignore[return-value]


async def test_stats_are_off_by_default_and_register_no_event(database_url: str) -> None:
    db = Database(database_url)
    seen: list[RequestStats | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.session.execute(text("SELECT 1"))
        seen.append(db.stats)
        await plain_response(send, 200)

    try:
        recorder = await call_http(SQLAlchemyMiddleware(app, db))
        dispatch = db.engine.sync_engine.dispatch
        # No engine listener: the count of statements sent (``_reconnect``) is the
        # dialect's, which does not turn on every connection event (tests/test_hot_path.py).
        assert len(dispatch.after_cursor_execute) == 0
        assert len(dispatch.before_cursor_execute) == 0
        assert len(db.engine.sync_engine.pool.dispatch.checkout) == 0
    finally:
        await db.dispose()

    assert seen == [None]
    assert header(recorder, b"server-timing") == []


async def test_stats_count_statements_time_and_the_held_connection(db: Database) -> None:
    seen: list[RequestStats] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for _ in range(3):
            await db.session.execute(text("SELECT 1"))
        await db.release()
        stats = db.stats
        assert stats is not None
        seen.append(RequestStats(**vars(stats)))
        await plain_response(send, 200)

    await call_http(SQLAlchemyMiddleware(app, db))

    [stats] = seen
    assert stats.statements == 3
    assert 0 < stats.duration <= stats.held
    assert stats.outcome == "committed"


@pytest.mark.parametrize(("status", "outcome"), [(201, "committed"), (404, "rolled back")])
async def test_the_outcome_follows_the_status(db: Database, status: int, outcome: str) -> None:
    outcomes: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "k")
        await plain_response(send, status)
        assert db.stats is not None
        outcomes.append(db.stats.outcome)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert outcomes == [outcome]


async def test_a_failed_commit_is_recorded_as_such(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await orphan_child(db)
        await plain_response(send, 200)

    with caplog.at_level(logging.DEBUG, logger="asgi_sqla"):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 500
    [record] = [r for r in caplog.records if getattr(r, "outcome", None) is not None]
    assert record.outcome == "commit failed"  # type: ignore[attr-defined]


async def test_server_timing_shows_the_database_time_and_statement_count(
    database_url: str,
) -> None:
    db = Database(database_url)  # the middleware's server_timing turns stats on
    try:
        app = SQLAlchemyMiddleware(three_statements(db), db, server_timing=True)
        recorder = await call_http(app)
    finally:
        await db.dispose()

    [value] = header(recorder, b"server-timing")
    name, duration, description = value.decode().split(";")
    assert name == "db"
    assert float(duration.removeprefix("dur=")) >= 0
    # BEGIN (sent on its own by the PostgreSQL drivers, none on SQLite), 3, COMMIT.
    round_trips = 4 if database_url.startswith("sqlite") else 5
    assert description == f'desc="3 queries, {round_trips} round trips"'


async def test_no_server_timing_for_a_request_that_did_not_use_the_database(
    db: Database,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db, server_timing=True))

    assert header(recorder, b"server-timing") == []


@pytest.mark.parametrize("framework", ["fastapi", "starlette"])
async def test_too_many_statements_warn_with_the_route_template(
    database_url: str, caplog: pytest.LogCaptureFixture, framework: str
) -> None:
    db = Database(database_url, warn_statements_over=2)

    async def endpoint(id: str) -> PlainTextResponse:
        for _ in range(3):
            await db.session.execute(text("SELECT :secret"), {"secret": PASSWORD_LIKE})
        return PlainTextResponse("ok")

    async def starlette_endpoint(request: Request) -> PlainTextResponse:
        return await endpoint(request.path_params["id"])

    inner: ASGIApp
    if framework == "fastapi":
        fastapi = FastAPI()
        fastapi.get("/users/{id}")(endpoint)
        inner = fastapi
    else:
        inner = Starlette(routes=[Route("/users/{id}", starlette_endpoint)])
    app = SQLAlchemyMiddleware(inner, db)
    try:
        with caplog.at_level(logging.WARNING, logger="asgi_sqla"):
            await call_http(app, "/users/42")
    finally:
        await db.dispose()

    # Starlette's Router sets scope["route"] since 1.7, FastAPI's routes always have; without
    # it the record names the path itself.
    knows_the_route = framework == "fastapi" or release("starlette") >= (1, 7)
    route = "/users/{id}" if knows_the_route else "/users/42"
    [record] = [r for r in caplog.records if r.name == "asgi_sqla"]
    assert record.levelno == logging.WARNING
    assert f"GET {route} sent 3 statements" in record.getMessage()
    assert record.route == route  # type: ignore[attr-defined]
    assert record.statements == 3  # type: ignore[attr-defined]
    assert PASSWORD_LIKE not in record.getMessage()
    assert PASSWORD_LIKE not in repr(vars(record))


async def test_a_connection_held_too_long_warns(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(database_url, warn_held_over=0)
    try:
        with caplog.at_level(logging.WARNING, logger="asgi_sqla"):
            await call_http(SQLAlchemyMiddleware(three_statements(db), db), "/slow")
    finally:
        await db.dispose()

    messages = [r.getMessage() for r in caplog.records if r.name == "asgi_sqla"]
    assert len(messages) == 1
    assert messages[0].startswith("GET /slow held a connection of Database(")


async def test_every_request_that_used_the_database_gets_a_structured_debug_record(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="asgi_sqla"):
        await call_http(SQLAlchemyMiddleware(three_statements(db, 409), db), "/x")

    [record] = [r for r in caplog.records if r.name == "asgi_sqla"]
    fields = {k: getattr(record, k) for k in ("route", "method", "statements", "outcome")}
    assert fields == {"route": "/x", "method": "GET", "statements": 3, "outcome": "rolled back"}


async def test_pool_status_reports_the_connections_in_use(db: Database) -> None:
    during: list[PoolStatus] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.session.execute(text("SELECT 1"))
        during.append(db.pool_status())
        await plain_response(send, 200)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert during[0].checked_out == 1
    assert db.pool_status().checked_out == 0
    assert db.pool_status().checked_in >= 1
