"""Promise 5: ``db.commit()``, ``db.rollback()`` and ``db.release()`` mid-request.

Plus ``db.scope()`` and ``db.new_session()``, the ways to get a session outside the
request's own.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_sqla import (
    Database,
    NoSessionContextError,
    SessionContext,
    SessionEndedError,
    SQLAlchemyMiddleware,
)
from asgi_sqla.types import Receive, Scope, Send

from _helpers import (
    PoolEvents,
    add_key,
    call_http,
    checked_out,
    create_tables,
    items,
    keys,
    plain_response,
)

pytestmark = pytest.mark.anyio


class ScopeError(Exception):
    """Raised by a test inside a block."""


async def visible_count(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(items)) or 0)


# -- db.commit() and db.rollback() ---------------------------------------------------------


async def test_a_mid_request_commit_survives_a_later_4xx(db: Database) -> None:
    committed_mid_request: list[set[str]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "committed")
        await db.commit()
        committed_mid_request.append(await keys(db))
        await add_key(db, "rolled back")
        await plain_response(send, 409)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 409
    assert committed_mid_request == [{"committed"}]
    assert await keys(db) == {"committed"}
    assert checked_out(db) == 0


async def test_the_session_stays_the_same_after_a_mid_request_commit(db: Database) -> None:
    sessions: list[AsyncSession] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sessions.append(db.session)
        await add_key(db, "one")
        await db.commit()
        sessions.append(db.session)
        await add_key(db, "two")
        await plain_response(send, 200)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert sessions[0] is sessions[1]
    assert await keys(db) == {"one", "two"}


async def test_a_mid_request_rollback_discards_only_what_came_before(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "discarded")
        await db.rollback()
        await add_key(db, "kept")
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert await keys(db) == {"kept"}
    assert checked_out(db) == 0


# -- db.release() -------------------------------------------------------------------------


async def test_release_commits_and_returns_the_connection_at_once(db: Database) -> None:
    observed: dict[str, object] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        first = db.session
        await add_key(db, "released")
        observed["before"] = checked_out(db)
        await db.release()
        observed["after"] = checked_out(db)
        observed["has_sessions"] = SessionContext.from_scope(scope).has_sessions
        observed["committed"] = await keys(db)
        observed["new session"] = db.session is not first
        await add_key(db, "after release")
        await plain_response(send, 500)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 500
    assert observed == {
        "before": 1,
        "after": 0,
        "has_sessions": False,
        "committed": {"released"},
        "new session": True,
    }
    assert await keys(db) == {"released"}
    assert checked_out(db) == 0


async def test_release_without_commit_discards_the_work(db: Database) -> None:
    observed: dict[str, object] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "discarded")
        await db.release(commit=False)
        observed["after"] = checked_out(db)
        observed["committed"] = await keys(db)
        await add_key(db, "kept")
        await plain_response(send, 200)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert observed == {"after": 0, "committed": set()}
    assert await keys(db) == {"kept"}
    assert checked_out(db) == 0


async def test_a_stale_reference_to_a_released_session_raises_session_ended_error(
    db: Database,
) -> None:
    outcomes: dict[str, str] = {}
    pool_after_cleanup: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        stale = db.session
        await add_key(db, "released")
        await db.release()
        attempts = {
            "execute": lambda: stale.execute(text("SELECT 1")),
            "scalar": lambda: stale.scalar(text("SELECT 1")),
            "commit": stale.commit,
            "rollback": stale.rollback,
            "flush": stale.flush,
        }
        for name, attempt in attempts.items():
            try:
                await attempt()
            except SessionEndedError:
                outcomes[name] = "SessionEndedError"
            else:
                outcomes[name] = "no error"
        await stale.close()  # cleanup of an ended session is harmless
        pool_after_cleanup.append(checked_out(db))
        await plain_response(send, 200)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert outcomes == dict.fromkeys(
        ["execute", "scalar", "commit", "rollback", "flush"], "SessionEndedError"
    )
    assert pool_after_cleanup == [0]
    assert await keys(db) == {"released"}
    assert checked_out(db) == 0


async def test_commit_rollback_and_release_do_nothing_when_no_session_was_opened(
    db: Database,
) -> None:
    events = PoolEvents(db)
    observed: dict[str, object] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.commit()
        await db.rollback()
        await db.release()
        await db.release(commit=False)
        observed["has_sessions"] = SessionContext.from_scope(scope).has_sessions
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert observed == {"has_sessions": False}
    assert events.checkouts == 0
    assert checked_out(db) == 0


async def test_commit_rollback_and_release_do_nothing_outside_any_context(db: Database) -> None:
    events = PoolEvents(db)

    await db.commit()
    await db.rollback()
    await db.release()
    await db.release(commit=False)

    assert events.checkouts == 0
    with pytest.raises(NoSessionContextError):
        db.session  # noqa: B018


# -- db.scope() ----------------------------------------------------------------------------


async def test_scope_commits_on_normal_exit(db: Database) -> None:
    async with db.scope() as session:
        assert db.session is session
        await add_key(db, "scoped")
        assert checked_out(db) == 1
        assert await keys(db) == set()

    assert await keys(db) == {"scoped"}
    assert checked_out(db) == 0


async def test_scope_rolls_back_on_exception_and_lets_it_propagate(db: Database) -> None:
    error = ScopeError("inside the scope")

    with pytest.raises(ScopeError) as raised:  # noqa: PT012
        async with db.scope():
            await add_key(db, "scoped")
            raise error

    assert raised.value is error
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_the_scope_session_is_unusable_after_the_block(db: Database) -> None:
    async with db.scope() as session:
        await add_key(db, "scoped")

    with pytest.raises(SessionEndedError):
        await session.execute(text("SELECT 1"))
    with pytest.raises(NoSessionContextError):
        db.session  # noqa: B018
    assert checked_out(db) == 0


async def test_scope_with_commit_on_none_commits_nothing(database_url: str) -> None:
    db = Database(database_url, commit_on=None)
    try:
        await create_tables(db)
        async with db.scope():
            await add_key(db, "scoped")
        assert await keys(db) == set()
        assert checked_out(db) == 0
    finally:
        await db.dispose()


# -- db.new_session() ----------------------------------------------------------------------


async def test_new_session_commits_independently_of_the_request(db: Database) -> None:
    observed: dict[str, object] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # First the independent session (SQLite allows one writer at a time).
        async with db.new_session() as independent:
            observed["distinct"] = independent is not db.session
            await independent.execute(items.insert().values(key="independent"))
        observed["committed at exit"] = await keys(db)
        await add_key(db, "request")
        await plain_response(send, 500)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 500
    assert observed == {"distinct": True, "committed at exit": {"independent"}}
    assert await keys(db) == {"independent"}
    assert checked_out(db) == 0


async def test_new_session_rolls_back_on_exception(db: Database) -> None:
    error = RuntimeError("inside new_session")

    with pytest.raises(RuntimeError) as raised:  # noqa: PT012
        async with db.new_session() as session:
            await session.execute(items.insert().values(key="discarded"))
            raise error

    assert raised.value is error
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_new_session_has_its_own_transaction_beside_the_request_session(
    postgresql_url: str,
) -> None:
    db = Database(postgresql_url)
    try:
        await create_tables(db)
        observed: dict[str, object] = {}

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, "request")
            async with db.new_session() as independent:
                observed["sees the request's row"] = await visible_count(independent)
                await independent.execute(items.insert().values(key="independent"))
                observed["connections"] = checked_out(db)
            observed["request sees the committed row"] = await visible_count(db.session)
            observed["committed"] = await keys(db)
            await plain_response(send, 422)

        recorder = await call_http(SQLAlchemyMiddleware(app, db))

        assert recorder.status == 422
        assert observed == {
            "sees the request's row": 0,
            "connections": 2,
            "request sees the committed row": 2,
            "committed": {"independent"},
        }
        assert await keys(db) == {"independent"}
        assert checked_out(db) == 0
    finally:
        await db.dispose()
