"""One session is never used by two tasks at once; ``db.new_session()`` is for concurrent work."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import func, select, text
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelSession
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_sqla import ConcurrentSessionUseError, Database, SQLAlchemyMiddleware
from asgi_sqla.types import Message, Receive, Scope, Send

from _helpers import (
    add_key,
    call_http,
    checked_out,
    create_tables,
    items,
    keys,
    plain_response,
    settled_backends,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

pytestmark = pytest.mark.anyio


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await create_tables(database)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def admin(request: pytest.FixtureRequest, database_url: str) -> Any:
    """The ``pg_admin`` connection on PostgreSQL, None on SQLite."""
    if database_url.startswith("postgresql"):
        return request.getfixturevalue("pg_admin")
    return None


async def assert_nothing_left_behind(db: Database, admin: Any) -> None:
    """No connection checked out, no PostgreSQL backend left in a transaction or a statement."""
    assert checked_out(db) == 0
    if admin is not None:
        assert await settled_backends(admin) == []


async def assert_next_request_commits(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "next")
        await plain_response(send, 201)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))
    assert recorder.status == 201
    assert "next" in await keys(db)
    assert checked_out(db) == 0


async def count_rows(db: Database) -> None:
    """One statement on the request's session (the caller's task is suspended inside it)."""
    await db.session.execute(select(func.count()).select_from(items))


async def _gather(db: Database) -> None:
    await asyncio.gather(count_rows(db), count_rows(db))


async def _task_group(db: Database) -> None:
    async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined,unused-ignore]
        group.create_task(count_rows(db))
        group.create_task(count_rows(db))


async def _anyio_task_group(db: Database) -> None:
    async with anyio.create_task_group() as group:
        group.start_soon(count_rows, db)
        group.start_soon(count_rows, db)


RUNNERS: dict[str, Callable[[Database], Awaitable[None]]] = {
    "gather": _gather,
    "taskgroup": _task_group,
    "anyio": _anyio_task_group,
}


@pytest.mark.parametrize(
    "runner",
    [
        "gather",
        pytest.param(
            "taskgroup",
            marks=pytest.mark.skipif(
                sys.version_info < (3, 11), reason="asyncio.TaskGroup is new in 3.11"
            ),
        ),
        "anyio",
    ],
)
async def test_two_child_tasks_using_db_session_at_once_raise_concurrent_session_use_error(
    db: Database, admin: Any, runner: str
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # The transaction is open and the connection checked out before the children
        # start, so the first child is suspended inside its statement when the second
        # one reaches the session.
        await add_key(db, "before")
        await RUNNERS[runner](db)
        await plain_response(send, 201)

    # The task groups wrap the error in a group (and cancel the first child, which is
    # in the middle of its statement); gather passes it on as is.
    expected = ConcurrentSessionUseError if runner == "gather" else BaseExceptionGroup
    with anyio.fail_after(10), pytest.raises(expected) as info:
        await call_http(SQLAlchemyMiddleware(app, db))

    error: BaseException = info.value
    if isinstance(error, BaseExceptionGroup):
        [error] = error.exceptions
    assert isinstance(error, ConcurrentSessionUseError)
    assert "db.new_session()" in str(error)
    await assert_nothing_left_behind(db, admin)
    assert await keys(db) == set()
    await assert_next_request_commits(db)


async def test_concurrent_use_below_starlette_answers_500_and_rolls_back(
    db: Database, admin: Any
) -> None:
    async def endpoint(request: Request) -> Response:
        await add_key(db, "before")
        await asyncio.gather(count_rows(db), count_rows(db))
        return PlainTextResponse("unreachable", status_code=201)

    app = SQLAlchemyMiddleware(Starlette(routes=[Route("/", endpoint, methods=["POST"])]), db)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.post("/")

    assert response.status_code == 500
    await assert_nothing_left_behind(db, admin)
    assert await keys(db) == set()


async def test_child_tasks_may_use_the_session_one_after_another(db: Database, admin: Any) -> None:
    lock = asyncio.Lock()
    pool_at_start: list[int] = []

    async def locked_write(key: str) -> None:
        async with lock:
            await add_key(db, key)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.create_task(add_key(db, "task-1"))
        await add_key(db, "request")
        async with anyio.create_task_group() as group:
            group.start_soon(add_key, db, "task-2")
        # Concurrent tasks are fine when they take turns.
        await asyncio.gather(locked_write("locked-1"), locked_write("locked-2"))
        await plain_response(send, 201)

    def on_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            pool_at_start.append(checked_out(db))

    recorder = await call_http(SQLAlchemyMiddleware(app, db), on_send=on_send)

    assert recorder.status == 201
    assert pool_at_start == [0]
    assert await keys(db) == {"task-1", "request", "task-2", "locked-1", "locked-2"}
    await assert_nothing_left_behind(db, admin)


async def test_new_session_in_each_concurrent_child_task_has_its_own_connection_and_commits(
    db: Database, admin: Any
) -> None:
    tasks = 3
    arrived = 0
    all_arrived = anyio.Event()
    connections: dict[str, object] = {}
    peak: list[int] = []
    backend_pids: set[int] = set()

    async def child(key: str) -> None:
        nonlocal arrived
        async with db.new_session() as session:
            connection = await session.connection()
            connections[key] = (await connection.get_raw_connection()).dbapi_connection
            if admin is not None:
                backend_pids.add(int(await session.scalar(text("SELECT pg_backend_pid()"))))
            else:
                await session.execute(text("SELECT 1"))
            arrived += 1
            if arrived == tasks:
                all_arrived.set()
            await all_arrived.wait()  # every child holds its connection at this point
            peak.append(checked_out(db))
            await session.execute(items.insert().values(key=key))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:
            for number in range(tasks):
                group.start_soon(child, f"child-{number}")
        # The request's own session is independent: it rolls back (400) on its own.
        await add_key(db, "request")
        await plain_response(send, 400)

    with anyio.fail_after(20):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 400
    assert peak == [tasks] * tasks
    assert len({id(connection) for connection in connections.values()}) == tasks
    if admin is not None:
        assert len(backend_pids) == tasks
    assert await keys(db) == {f"child-{number}" for number in range(tasks)}
    await assert_nothing_left_behind(db, admin)


async def test_a_session_class_with_its_own_methods_meets_the_guard_too(
    database_url: str, admin: Any
) -> None:
    # SQLModel's exec() runs the synchronous session directly, past AsyncSession's methods.
    db = Database(database_url, session_options={"class_": SQLModelSession})
    await create_tables(db)

    async def exec_on_db_session(statement: Any) -> None:
        await db.session.exec(statement)  # type: ignore[attr-defined]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await exec_on_db_session(items.insert().values(key="before"))
        count = select(func.count()).select_from(items)
        await asyncio.gather(exec_on_db_session(count), exec_on_db_session(count))
        await plain_response(send, 201)

    async def next_app(scope: Scope, receive: Receive, send: Send) -> None:
        await exec_on_db_session(items.insert().values(key="next"))
        await plain_response(send, 201)

    try:
        with anyio.fail_after(10), pytest.raises(ConcurrentSessionUseError, match="new_session"):
            await call_http(SQLAlchemyMiddleware(app, db))

        await assert_nothing_left_behind(db, admin)
        assert await keys(db) == set()
        assert (await call_http(SQLAlchemyMiddleware(next_app, db))).status == 201
        assert await keys(db) == {"next"}
    finally:
        await db.dispose()
