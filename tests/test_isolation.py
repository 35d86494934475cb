"""Promise 9: concurrent and sequential requests never see each other's session."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_sqla import Database, NoSessionContextError, SessionContext, SQLAlchemyMiddleware
from asgi_sqla.types import Receive, Scope, Send

from _helpers import add_key, call_http, checked_out, create_tables, items, keys, plain_response

pytestmark = pytest.mark.anyio

#: Concurrent requests per backend.  On PostgreSQL they all hold their uncommitted row
#: at the same time; SQLite allows one writer at a time, so there they queue up.
POSTGRESQL_REQUESTS = 200
SQLITE_REQUESTS = 20


@pytest.fixture
def db_options(database_url: str) -> dict[str, Any]:
    """On PostgreSQL, a pool just large enough for the concurrent requests."""
    if database_url.startswith("sqlite"):
        return {}
    return {"pool_size": POSTGRESQL_REQUESTS, "max_overflow": 0}


async def count_where(session: AsyncSession, *criteria: ColumnElement[bool]) -> int:
    query = select(func.count()).select_from(items).where(*criteria)
    return int(await session.scalar(query) or 0)


async def test_concurrent_requests_see_only_their_own_uncommitted_row(db: Database) -> None:
    postgresql = db.engine.dialect.name == "postgresql"
    requests = POSTGRESQL_REQUESTS if postgresql else SQLITE_REQUESTS
    inserted = read = 0
    all_inserted, all_read = anyio.Event(), anyio.Event()
    seen: dict[int, tuple[int, int]] = {}
    sessions: dict[int, AsyncSession] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal inserted, read
        number = int(scope["path"].strip("/"))
        sessions[number] = db.session
        await add_key(db, f"request-{number}-row")
        if postgresql:  # every request holds its uncommitted row before any reads
            inserted += 1
            if inserted == requests:
                all_inserted.set()
            await all_inserted.wait()
        own = await count_where(db.session, items.c.key.like(f"request-{number}-%"))
        everything = await count_where(db.session)
        seen[number] = (own, everything)
        if postgresql:  # nobody commits (at response start) before every request has read
            read += 1
            if read == requests:
                all_read.set()
            await all_read.wait()
        await plain_response(send, 201)

    middleware = SQLAlchemyMiddleware(app, db)
    statuses: dict[int, int] = {}

    async def request(number: int) -> None:
        statuses[number] = (await call_http(middleware, f"/{number}", method="POST")).status

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for number in range(requests):
                tg.start_soon(request, number)

    assert statuses == dict.fromkeys(range(requests), 201)
    assert len({id(session) for session in sessions.values()}) == requests
    assert {number: own for number, (own, _) in seen.items()} == dict.fromkeys(range(requests), 1)
    if postgresql:
        # Nobody had committed yet: any other row seen would be another request's.
        assert {number: total for number, (_, total) in seen.items()} == dict.fromkeys(
            range(requests), 1
        )
    assert await keys(db) == {f"request-{number}-row" for number in range(requests)}
    assert checked_out(db) == 0


async def test_sequential_requests_in_one_task_do_not_share_a_session(db: Database) -> None:
    sessions: list[AsyncSession] = []
    contexts: list[SessionContext] = []
    visible: list[int] = []

    async def endpoint(request: Request) -> PlainTextResponse:
        number = int(request.path_params["number"])
        contexts.append(SessionContext.from_scope(request.scope))
        sessions.append(db.session)
        await add_key(db, f"row-{number}")
        visible.append(await count_where(db.session))
        return PlainTextResponse("rejected" if number == 1 else "ok", 400 if number == 1 else 200)

    app = Starlette(
        routes=[Route("/{number:int}", endpoint, methods=["POST"])],
        middleware=[Middleware(SQLAlchemyMiddleware, db)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        statuses = []
        for number in range(4):
            statuses.append((await client.post(f"/{number}")).status_code)
            # The request ran in this very task, and left no context behind in it.
            with pytest.raises(NoSessionContextError):
                SessionContext.current()

    assert statuses == [200, 400, 200, 200]
    assert len({id(context) for context in contexts}) == 4
    assert len({id(session) for session in sessions}) == 4
    assert all(context.ended for context in contexts)
    # Each sees the rows committed before it plus its own; never request 1's rolled-back row.
    assert visible == [1, 2, 2, 3]
    assert await keys(db) == {"row-0", "row-2", "row-3"}
    assert checked_out(db) == 0


async def test_a_request_does_not_see_another_requests_uncommitted_row(
    postgresql_url: str,
) -> None:
    db = Database(postgresql_url)
    try:
        await create_tables(db)
        writer_inserted = anyio.Event()
        reader_done = anyio.Event()
        seen: list[int] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["path"] == "/writer":
                await add_key(db, "uncommitted")
                writer_inserted.set()
                await reader_done.wait()
            else:
                await writer_inserted.wait()
                seen.append(await count_where(db.session))
                reader_done.set()
            await plain_response(send, 200)

        middleware = SQLAlchemyMiddleware(app, db)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call_http, middleware, "/writer")
                tg.start_soon(call_http, middleware, "/reader")

        assert seen == [0]
        assert await keys(db) == {"uncommitted"}
        assert checked_out(db) == 0
    finally:
        await db.dispose()
