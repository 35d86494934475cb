"""Promise 3: the connection is back in the pool before the body goes out.

At the moment the server receives ``http.response.start`` the transaction is over
(its outcome visible from other connections) and nothing is checked out.  Work the app
does with ``db.session`` after the start gets a fresh session, committed when the app
returns and rolled back when it raises.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_sqla import Database, SessionContext, SessionEndedError, SQLAlchemyMiddleware
from asgi_sqla.types import Message, Receive, Scope, Send

from _helpers import (
    ASGIRecorder,
    add_key,
    call_http,
    checked_out,
    http_scope,
    keys,
)

pytestmark = pytest.mark.anyio

START = "http.response.start"
BODY = "http.response.body"


def chunk(body: bytes, *, more: bool) -> Message:
    return {"type": BODY, "body": body, "more_body": more}


@pytest.mark.parametrize(("status", "committed"), [(200, True), (500, False)])
async def test_at_response_start_the_connection_is_back_and_the_outcome_is_visible(
    db: Database, status: int, committed: bool
) -> None:
    observed: list[tuple[int, set[str]]] = []

    async def on_send(message: Message) -> None:
        if message["type"] == START:
            # The pool first: keys() itself checks out a connection.
            pool = checked_out(db)
            observed.append((pool, await keys(db)))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "written")
        assert checked_out(db) == 1
        await send({"type": START, "status": status, "headers": []})
        await send(chunk(b"done", more=False))

    recorder = await call_http(SQLAlchemyMiddleware(app, db), on_send=on_send)

    assert recorder.status == status
    assert observed == [(0, {"written"} if committed else set())]
    assert checked_out(db) == 0


async def test_a_streaming_body_holds_no_connection_between_chunks(db: Database) -> None:
    pool_at_send: list[tuple[str, int]] = []
    pool_in_app: list[int] = []

    def on_send(message: Message) -> None:
        pool_at_send.append((message["type"], checked_out(db)))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "before the body")
        await send({"type": START, "status": 200, "headers": []})
        pool_in_app.append(checked_out(db))
        for part in (b"one", b"two", b"three"):
            await send(chunk(part, more=True))
            pool_in_app.append(checked_out(db))
        await send(chunk(b"", more=False))

    recorder = await call_http(SQLAlchemyMiddleware(app, db), on_send=on_send)

    assert recorder.body == b"onetwothree"
    assert pool_at_send == [(START, 0), (BODY, 0), (BODY, 0), (BODY, 0), (BODY, 0)]
    assert pool_in_app == [0, 0, 0, 0]
    assert await keys(db) == {"before the body"}


async def test_a_session_touched_during_the_body_is_fresh_and_commits_when_the_app_returns(
    db: Database,
) -> None:
    sessions: list[AsyncSession] = []
    committed_at_last_chunk: list[set[str]] = []

    async def on_send(message: Message) -> None:
        if message["type"] == BODY and not message["more_body"]:
            committed_at_last_chunk.append(await keys(db))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sessions.append(db.session)
        await add_key(db, "before")
        await send({"type": START, "status": 200, "headers": []})
        await send(chunk(b"head ", more=True))
        sessions.append(db.session)
        await add_key(db, "during")
        await send(chunk(b"tail", more=False))

    recorder = await call_http(SQLAlchemyMiddleware(app, db), on_send=on_send)

    assert recorder.body == b"head tail"
    assert sessions[0] is not sessions[1]
    # The body's session is still open at the last chunk; it commits when the app returns.
    assert committed_at_last_chunk == [{"before"}]
    assert await keys(db) == {"before", "during"}
    assert checked_out(db) == 0


async def test_a_session_opened_after_start_commits_even_for_an_error_status(
    db: Database,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "before")
        await send({"type": START, "status": 503, "headers": []})
        await add_key(db, "during")
        await send(chunk(b"", more=False))

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 503
    assert await keys(db) == {"during"}
    assert checked_out(db) == 0


async def test_a_session_touched_during_the_body_rolls_back_if_the_app_then_raises(
    db: Database,
) -> None:
    error = RuntimeError("the stream broke")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "before")
        await send({"type": START, "status": 200, "headers": []})
        await send(chunk(b"partial", more=True))
        await add_key(db, "during")
        raise error

    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    with pytest.raises(RuntimeError) as raised:
        await recorder(SQLAlchemyMiddleware(app, db), http_scope())

    assert raised.value is error
    assert recorder.types() == [START, BODY]
    assert await keys(db) == {"before"}
    assert checked_out(db) == 0


async def test_a_stale_session_kept_across_the_start_raises_session_ended_error(
    db: Database,
) -> None:
    outcome: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        stale = db.session
        await add_key(db, "before")
        await send({"type": START, "status": 200, "headers": []})
        try:
            await stale.execute(text("SELECT 1"))
        except SessionEndedError as error:
            outcome.append(error)
        outcome.append(checked_out(db))
        outcome.append(db.session is stale)
        await send(chunk(b"", more=False))

    await call_http(SQLAlchemyMiddleware(app, db))

    assert len(outcome) == 3
    assert isinstance(outcome[0], SessionEndedError)
    assert outcome[1:] == [0, False]
    assert await keys(db) == {"before"}
    assert checked_out(db) == 0


async def test_a_stale_session_never_used_before_the_start_also_raises(db: Database) -> None:
    errors: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        stale = db.session  # read, but no statement: no connection yet
        await send({"type": START, "status": 200, "headers": []})
        try:
            await stale.execute(text("SELECT 1"))
        except SessionEndedError as error:
            errors.append(error)
        await send(chunk(b"", more=False))

    await call_http(SQLAlchemyMiddleware(app, db))

    assert len(errors) == 1
    assert checked_out(db) == 0


async def test_the_context_holds_no_session_once_the_response_started(db: Database) -> None:
    has_sessions: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        context = SessionContext.from_scope(scope)
        await add_key(db, "before")
        has_sessions.append(context.has_sessions)
        await send({"type": START, "status": 200, "headers": []})
        has_sessions.append(context.has_sessions)
        has_sessions.append(context.ended)
        await send(chunk(b"", more=False))

    await call_http(SQLAlchemyMiddleware(app, db))

    assert has_sessions == [True, False, False]
