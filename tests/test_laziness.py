"""Promise 1: a request that never touches ``db.session`` costs no session and no connection."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_sqla import Database, SessionContext, SQLAlchemyMiddleware
from asgi_sqla.types import Receive, Scope, Send

from _helpers import (
    PoolEvents,
    add_key,
    call_http,
    checked_out,
    create_tables,
    keys,
    plain_response,
)

pytestmark = pytest.mark.anyio


async def test_a_request_that_never_reads_the_session_checks_out_no_connection(
    db: Database,
) -> None:
    events = PoolEvents(db)
    seen: dict[str, object] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        context = SessionContext.from_scope(scope)
        seen["has_sessions"] = context.has_sessions
        seen["checked_out"] = checked_out(db)
        await plain_response(send, 200, b"no database here")
        seen["has_sessions_after_start"] = context.has_sessions

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert recorder.body == b"no database here"
    assert seen == {"has_sessions": False, "checked_out": 0, "has_sessions_after_start": False}
    assert events.checkouts == 0
    assert events.connects == 0
    assert checked_out(db) == 0


async def test_a_request_that_never_reads_the_session_gets_its_messages_forwarded_unchanged(
    db: Database,
) -> None:
    start = {"type": "http.response.start", "status": 201, "headers": [(b"x-a", b"1")]}
    body = {"type": "http.response.body", "body": b"created", "more_body": False}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start)
        await send(body)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert len(recorder.sent) == 2
    assert recorder.sent[0] is start
    assert recorder.sent[1] is body
    assert start == {"type": "http.response.start", "status": 201, "headers": [(b"x-a", b"1")]}


async def test_reading_the_session_without_a_statement_checks_out_nothing(db: Database) -> None:
    events = PoolEvents(db)
    seen: dict[str, object] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        session = db.session
        seen["is_session"] = isinstance(session, AsyncSession)
        seen["has_sessions"] = SessionContext.from_scope(scope).has_sessions
        seen["checked_out"] = checked_out(db)
        seen["checkouts"] = events.checkouts
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert seen == {"is_session": True, "has_sessions": True, "checked_out": 0, "checkouts": 0}
    assert events.checkouts == 0
    assert checked_out(db) == 0


async def test_the_first_statement_checks_out_exactly_one_connection(db: Database) -> None:
    events = PoolEvents(db)
    seen: list[tuple[str, int, int]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(("before", checked_out(db), events.checkouts))
        await add_key(db, "first")
        seen.append(("after first", checked_out(db), events.checkouts))
        await db.session.execute(text("SELECT 1"))
        await add_key(db, "second")
        seen.append(("after third", checked_out(db), events.checkouts))
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert seen == [("before", 0, 0), ("after first", 1, 1), ("after third", 1, 1)]
    assert events.checkouts == 1
    assert checked_out(db) == 0
    assert await keys(db) == {"first", "second"}


async def test_two_reads_in_one_request_return_the_same_session(db: Database) -> None:
    sessions: list[AsyncSession] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sessions.append(db.session)
        await add_key(db, "one")
        sessions.append(db.session)
        await plain_response(send, 200)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert len(sessions) == 2
    assert sessions[0] is sessions[1]
    assert await keys(db) == {"one"}


async def test_a_request_touching_one_database_opens_nothing_on_the_other(
    db: Database, tmp_path: Path
) -> None:
    other = Database(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}")
    try:
        await create_tables(other)
        other_events = PoolEvents(other)
        seen: dict[str, object] = {}

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, "main")
            context = SessionContext.from_scope(scope)
            seen["main"] = context.existing(db) is not None
            seen["other"] = context.existing(other) is not None
            seen["other_checked_out"] = checked_out(other)
            await plain_response(send, 200)

        recorder = await call_http(SQLAlchemyMiddleware(app, db, other))

        assert recorder.status == 200
        assert seen == {"main": True, "other": False, "other_checked_out": 0}
        assert other_events.checkouts == 0
        assert await keys(db) == {"main"}
    finally:
        await other.dispose()
