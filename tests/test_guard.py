"""The guard holds for every way into the database, not only ``AsyncSession``'s own methods.

SQLModel's ``AsyncSession.exec()`` runs the synchronous session directly
(``greenlet_spawn(self.sync_session.exec, ...)``), past any wrapper on the async
methods.  Given as the ``Database``'s session class, it must still meet the guard: a
session kept past its request refuses to run, a pool timeout inside it is remembered
for the 503, and a serialization failure inside it for a retrying route.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import pytest
from sqlalchemy import func, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import Session as SQLModelSyncSession
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelSession

from asgi_sqla import Database, SessionEndedError, SQLAlchemyMiddleware
from asgi_sqla.types import Receive, Scope, Send

from _helpers import call_http, checked_out, create_tables, items, keys, plain_response

pytestmark = pytest.mark.anyio

SQLMODEL = {"class_": SQLModelSession}


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, session_options=SQLMODEL)
    await create_tables(database)
    try:
        yield database
    finally:
        await database.dispose()


async def count_rows(session: Any) -> int:
    return int((await session.exec(select(func.count()).select_from(items))).one())


async def test_sqlmodel_exec_on_a_session_kept_past_its_request_raises_and_checks_out_nothing(
    db: Database,
) -> None:
    kept: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kept.append(db.session)
        assert await count_rows(db.session) == 0
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))
    assert recorder.status == 200
    [session] = kept
    assert isinstance(session, SQLModelSession)
    assert checked_out(db) == 0

    with pytest.raises(SessionEndedError, match=r"db\.session"):
        await count_rows(session)

    assert checked_out(db) == 0
    await db.dispose()
    assert checked_out(db) == 0


async def test_sqlmodel_exec_after_release_raises_and_checks_out_nothing(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        released = db.session
        await count_rows(released)
        await db.release()
        with pytest.raises(SessionEndedError):
            await count_rows(released)
        assert checked_out(db) == 0
        assert await count_rows(db.session) == 0  # a new session
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert checked_out(db) == 0


async def test_a_sync_session_class_given_in_session_options_keeps_the_guard(
    database_url: str,
) -> None:
    db = Database(database_url, session_options={"sync_session_class": SQLModelSyncSession})
    await create_tables(db)
    kept: list[Any] = []

    def count_with_exec(session: Any) -> int:
        return int(session.exec(select(func.count()).select_from(items)).one())

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kept.append(db.session)
        assert await db.session.run_sync(count_with_exec) == 0
        await plain_response(send, 200)

    try:
        await call_http(SQLAlchemyMiddleware(app, db))
        [session] = kept
        assert isinstance(session.sync_session, SQLModelSyncSession)
        with pytest.raises(SessionEndedError):
            await session.run_sync(count_with_exec)
        assert checked_out(db) == 0
    finally:
        await db.dispose()


async def test_a_pool_timeout_inside_sqlmodel_exec_answers_503_with_retry_after(
    database_url: str,
) -> None:
    db = Database(
        database_url, session_options=SQLMODEL, pool_size=1, max_overflow=0, pool_timeout=0.2
    )
    await create_tables(db)
    holding = anyio.Event()
    release = anyio.Event()

    async def holder(scope: Scope, receive: Receive, send: Send) -> None:
        await count_rows(db.session)
        holding.set()
        await release.wait()
        await plain_response(send, 200)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await count_rows(db.session)
        except PoolTimeoutError:  # as a framework would: a plain 500
            await plain_response(send, 500, b"oops!")
            return
        await plain_response(send, 200)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(call_http, SQLAlchemyMiddleware(holder, db))
            await holding.wait()
            try:
                recorder = await call_http(SQLAlchemyMiddleware(app, db, retry_after=3))
            finally:
                release.set()
        assert checked_out(db) == 0
    finally:
        await db.dispose()

    assert recorder.status == 503
    start = next(m for m in recorder.sent if m["type"] == "http.response.start")
    assert [v for k, v in start["headers"] if k.lower() == b"retry-after"] == [b"3"]


async def test_a_conflict_inside_sqlmodel_exec_that_the_app_answered_500_is_retried(
    postgresql_url: str,
) -> None:
    db = Database(postgresql_url, isolation_level="REPEATABLE READ", session_options=SQLMODEL)
    await create_tables(db)
    async with db.engine.begin() as connection:
        await connection.execute(items.insert().values(key="row"))
    attempts = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal attempts
        attempts += 1
        await count_rows(db.session)  # the transaction's snapshot is taken here
        if attempts == 1:
            async with db.engine.begin() as other:  # another transaction changes the row
                await other.execute(update(items).values(key="changed elsewhere"))
        try:
            await cast(SQLModelSession, db.session).exec(
                update(items).values(key=f"attempt {attempts}")
            )
        except DBAPIError:  # "could not serialize access", as a framework would: a 500
            await plain_response(send, 500)
            return
        await plain_response(send, 201)

    try:
        recorder = await call_http(SQLAlchemyMiddleware(app, db, retry=["/*"]), method="POST")
        assert recorder.status == 201
        assert attempts == 2
        assert await keys(db) == {"attempt 2"}
        assert checked_out(db) == 0
    finally:
        await db.dispose()
