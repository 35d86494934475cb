"""Cancellation at any await point never leaks a connection or a transaction (PostgreSQL).

Every test runs on a pool of one connection (no overflow), so the request after the
cancelled one only works if that connection came back to the pool, usable, or was
discarded.  The package's cleanup is shielded (``run_to_completion``): a cancellation
that arrives meanwhile is re-raised once the cleanup has finished.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from sqlalchemy import event, text
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from asgi_sqla import Database, SQLAlchemyMiddleware
from asgi_sqla.types import ASGIApp, Receive, Scope, Send

from _helpers import (
    CANCEL_STYLES,
    ASGIRecorder,
    Cancel,
    add_key,
    call_http,
    cancel_request,
    checked_out,
    http_scope,
    idle_in_transaction,
    keys,
    open_slow_commit_database,
    plain_response,
    settled_backends,
    wait_for_active_query,
    when_running,
)

pytestmark = pytest.mark.anyio

#: A statement that runs until it is cancelled.
SLOW_QUERY = "SELECT pg_sleep(10)"


@pytest.fixture
async def db(postgresql_url: str) -> AsyncIterator[Database]:
    """One connection, no overflow; the COMMIT of a key starting with "slow" takes 0.5 s."""
    database = await open_slow_commit_database(postgresql_url)
    try:
        yield database
    finally:
        await database.dispose()


async def assert_nothing_leaked(db: Database, admin: Any) -> None:
    """No connection checked out, no backend left idle in a transaction."""
    assert checked_out(db) == 0
    assert await idle_in_transaction(admin) == []


async def assert_next_request_works(db: Database, key: str = "next") -> None:
    """A request on the pool of one connection commits (the pool is not stuck or broken)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, key)
        await plain_response(send, 201)

    with anyio.fail_after(10):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))
    assert recorder.status == 201
    assert key in await keys(db)
    assert checked_out(db) == 0


@pytest.mark.parametrize("style", CANCEL_STYLES)
async def test_cancelling_a_request_mid_query_rolls_back_and_frees_the_connection(
    db: Database, pg_admin: Any, style: str
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "cancelled")
        await db.session.execute(text(SLOW_QUERY))
        await plain_response(send, 201)

    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    wrapped = SQLAlchemyMiddleware(app, db)

    await cancel_request(
        style, lambda: recorder(wrapped, http_scope()), when_running(pg_admin, "%pg_sleep(10)%")
    )

    assert recorder.sent == []
    await assert_nothing_leaked(db, pg_admin)
    assert await keys(db) == set()
    await assert_next_request_works(db)


@pytest.mark.parametrize("style", CANCEL_STYLES)
async def test_cancelling_a_request_mid_commit_finishes_the_commit_and_sends_only_its_status(
    db: Database, pg_admin: Any, style: str
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "slow-commit")
        await plain_response(send, 201)

    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    wrapped = SQLAlchemyMiddleware(app, db)

    # The COMMIT runs at response start, before the status goes out; the deferred
    # trigger keeps the server busy in it while the request is cancelled.
    await cancel_request(
        style, lambda: recorder(wrapped, http_scope()), when_running(pg_admin, "COMMIT%")
    )

    # The shielded commit was not abandoned halfway, and the client gets the status it
    # decided (a deadline's 504 would now lie), and nothing after it.
    assert recorder.sent == [{"type": "http.response.start", "status": 201, "headers": []}]
    await assert_nothing_leaked(db, pg_admin)
    assert await keys(db) == {"slow-commit"}
    await assert_next_request_works(db)


@pytest.mark.parametrize("style", CANCEL_STYLES)
async def test_cancelling_a_request_mid_close_still_returns_the_connection(
    db: Database, pg_admin: Any, style: str
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "rolled-back")
        await plain_response(send, 400)  # the session is rolled back and closed now

    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    wrapped = SQLAlchemyMiddleware(app, db)
    rollbacks: list[object] = []
    rolling_back = anyio.Event()

    async def trigger(cancel: Cancel) -> None:
        # Cancel from inside the close, at the moment its ROLLBACK starts.
        def on_rollback(connection: object) -> None:
            if not rollbacks:
                cancel()
                rolling_back.set()
            rollbacks.append(connection)

        event.listen(db.engine.sync_engine, "rollback", on_rollback)
        try:
            await rolling_back.wait()
        finally:
            event.remove(db.engine.sync_engine, "rollback", on_rollback)

    await cancel_request(style, lambda: recorder(wrapped, http_scope()), trigger)

    assert rollbacks  # the premise: the cancellation came during the rollback
    assert recorder.sent == [{"type": "http.response.start", "status": 400, "headers": []}]
    await assert_nothing_leaked(db, pg_admin)
    assert await keys(db) == set()
    await assert_next_request_works(db)


async def test_a_client_disconnect_that_makes_the_handler_raise_rolls_back(
    db: Database, pg_admin: Any
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the request body
        await add_key(db, "abandoned")
        disconnected = False
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                nonlocal disconnected
                message = await receive()
                disconnected = message["type"] == "http.disconnect"
                group.cancel_scope.cancel()

            group.start_soon(watch)
            await db.session.execute(text(SLOW_QUERY))
        if disconnected:
            raise ClientDisconnect()
        await plain_response(send, 201)

    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    errors: list[BaseException] = []

    async def serve() -> None:
        try:
            await recorder(SQLAlchemyMiddleware(app, db), http_scope())
        except BaseException as exc:
            errors.append(exc)

    with anyio.fail_after(15):
        async with anyio.create_task_group() as group:
            group.start_soon(serve)
            await wait_for_active_query(pg_admin, "%pg_sleep(10)%")
            recorder.disconnect()

    assert [type(error) for error in errors] == [ClientDisconnect]  # propagated unchanged
    assert recorder.sent == []
    await assert_nothing_leaked(db, pg_admin)
    assert await keys(db) == set()
    await assert_next_request_works(db)


async def test_a_client_disconnect_during_a_streaming_body_cancels_its_query_without_leaking(
    db: Database, pg_admin: Any
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"first chunk;"
        # A session opened after the response started, in Starlette's streaming task.
        await add_key(db, "streamed")
        await db.session.execute(text(SLOW_QUERY))
        yield b"never sent"

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(body(), media_type="text/plain")

    app: ASGIApp = SQLAlchemyMiddleware(Starlette(routes=[Route("/", endpoint)]), db)
    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    # Before ASGI spec 2.4 Starlette listens for http.disconnect while it streams and
    # cancels the body when it comes, mid-statement here.
    scope = http_scope(asgi={"version": "3.0", "spec_version": "2.3"})
    with anyio.fail_after(15):
        async with anyio.create_task_group() as group:
            group.start_soon(recorder, app, scope)
            await wait_for_active_query(pg_admin, "%pg_sleep(10)%")
            recorder.disconnect()

    assert recorder.status == 200
    assert recorder.body == b"first chunk;"
    await assert_nothing_leaked(db, pg_admin)
    assert await keys(db) == set()
    await assert_next_request_works(db)


async def test_an_app_that_swallows_a_cancelled_statement_and_answers_201_gets_a_500(
    db: Database, pg_admin: Any
) -> None:
    async def cancel_when_running(scope: anyio.CancelScope) -> None:
        await wait_for_active_query(pg_admin, "%pg_sleep(10)%")
        scope.cancel()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "half-done")
        async with anyio.create_task_group() as group:
            with anyio.CancelScope() as statement_scope:
                group.start_soon(cancel_when_running, statement_scope)
                await db.session.execute(text(SLOW_QUERY))
        # The app carries on as if nothing happened: the connection is in an unknown
        # state, so the transaction must not be reported as committed.
        await plain_response(send, 201, b"created")

    with anyio.fail_after(15):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 500
    assert b"created" not in recorder.body
    await assert_nothing_leaked(db, pg_admin)
    assert await keys(db) == set()
    await assert_next_request_works(db)


async def _cancel_a_streaming_body_by_disconnecting(db: Database, admin: Any, key: str) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"first chunk;"
        await add_key(db, key)
        await db.session.execute(text(SLOW_QUERY))
        yield b"never sent"

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(body(), media_type="text/plain")

    app = SQLAlchemyMiddleware(Starlette(routes=[Route("/", endpoint)]), db)
    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    scope = http_scope(asgi={"version": "3.0", "spec_version": "2.3"})
    with anyio.fail_after(15):
        async with anyio.create_task_group() as group:
            group.start_soon(recorder, app, scope)
            await wait_for_active_query(admin, "%pg_sleep(10)%")
            recorder.disconnect()


def connection_checking_options(url: str) -> dict[str, Any]:
    """Engine options making the server stop a statement once its client has gone.

    ``client_connection_check_interval`` (PostgreSQL 14+) is the recipe
    docs/guides/cancellation-and-faults.md gives.
    """
    if url.startswith("postgresql+asyncpg"):
        settings = {"client_connection_check_interval": "200"}
        return {"connect_args": {"server_settings": settings}}
    return {"connect_args": {"options": "-c client_connection_check_interval=200"}}


@pytest.mark.parametrize("how", ["task-cancel", "cancel-scope", "streaming-disconnect"])
async def test_a_cancelled_request_leaves_no_statement_running_on_the_server(
    db: Database, postgresql_url: str, pg_admin: Any, how: str
) -> None:
    """The request is over, so its transaction must be over on the server too.

    A statement left running there keeps the dead request's transaction open, with its
    locks: retrying the same write would wait for it.  ``Task.cancel()`` lets the driver
    send PostgreSQL a cancel request.  An anyio cancel scope re-delivers its cancellation
    at every await, which interrupts the drivers' own cancel handling: they close the
    socket instead, and the server only notices with ``client_connection_check_interval``
    set (the recipe of docs/guides/cancellation-and-faults.md), which these variants use.
    """
    key = "retried"
    if how != "task-cancel":
        await db.dispose()
        db = Database(
            postgresql_url,
            pool_size=1,
            max_overflow=0,
            **connection_checking_options(postgresql_url),
        )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, key)
        await db.session.execute(text(SLOW_QUERY))
        await plain_response(send, 201)

    try:
        if how == "streaming-disconnect":
            await _cancel_a_streaming_body_by_disconnecting(db, pg_admin, key)
        else:
            recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
            wrapped = SQLAlchemyMiddleware(app, db)
            await cancel_request(
                how,
                lambda: recorder(wrapped, http_scope()),
                when_running(pg_admin, "%pg_sleep(10)%"),
            )

        assert checked_out(db) == 0
        assert await settled_backends(pg_admin, seconds=2) == []
        # The consequence: the same unique key can be written again at once.
        with anyio.fail_after(2):
            await assert_next_request_works(db, key)
    finally:
        if how != "task-cancel":
            await db.dispose()
