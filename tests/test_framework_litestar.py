"""Litestar: the dependency and Litestar's own handling, in-process.

``examples/litestar_app.py`` in real servers is tested with the other examples in
``tests/test_frameworks.py``.  The tests here check ``asgi_sqla.litestar.provide_session``,
how Litestar's handling of an exception raised from ``send()`` meets a failed commit,
and why the middleware wraps the application object rather than being a Litestar
middleware.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
from litestar import Litestar, Response, get, post
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.params import FromPath
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_sqla import Database, SQLAlchemyMiddleware
from asgi_sqla.litestar import provide_session
from asgi_sqla.types import Message, Scope

from _helpers import (
    PoolEvents,
    add_key,
    as_asgi_app,
    call_http,
    checked_out,
    items,
    keys,
    orphan_child,
    started_engine,
)

pytestmark = pytest.mark.anyio


# --- The dependency and Litestar's own handling, in-process -------------------------


@pytest.fixture
def database_url(sqlite_or_asyncpg_url: str) -> str:
    """What is under test here is the framework's way of calling the app, not the driver."""
    return sqlite_or_asyncpg_url


async def test_the_provided_session_is_db_session_of_the_same_request(db: Database) -> None:
    seen: list[tuple[AsyncSession, AsyncSession]] = []

    @post("/{key:str}", status_code=201)
    async def handler(key: FromPath[str], session: NamedDependency[AsyncSession]) -> str:
        seen.append((session, db.session))
        await session.execute(items.insert().values(key=key))
        return key

    app = SQLAlchemyMiddleware(
        Litestar([handler], dependencies={"session": provide_session(db)}),
        db,
    )

    first = await call_http(app, "/first", method="POST")
    second = await call_http(app, "/second", method="POST")

    assert (first.status, second.status) == (201, 201)
    assert seen[0][0] is seen[0][1]
    assert seen[1][0] is seen[1][1]
    assert seen[0][0] is not seen[1][0]  # one session per request
    assert await keys(db) == {"first", "second"}
    assert checked_out(db) == 0


async def test_declaring_the_session_without_using_it_takes_no_connection(db: Database) -> None:
    pool = PoolEvents(db)

    @get("/")
    async def handler(session: NamedDependency[AsyncSession]) -> str:
        return "untouched"

    app = SQLAlchemyMiddleware(
        Litestar([handler], dependencies={"session": provide_session(db)}),
        db,
    )

    recorder = await call_http(app, "/")

    assert recorder.status == 200
    assert pool.checkouts == 0


async def test_a_background_task_never_runs_after_a_failed_commit(db: Database) -> None:
    ran: list[str] = []

    async def record() -> None:
        ran.append("background")
        await add_key(db, "background")

    @post("/", status_code=201)
    async def handler() -> Response[str]:
        await add_key(db, "request")
        await orphan_child(db)  # passes now, fails at COMMIT
        return Response("created", status_code=201, background=BackgroundTask(record))

    app = SQLAlchemyMiddleware(Litestar([handler]), db)

    # Litestar wraps the CommitFailedError raised from send() in "Exception caught
    # after response started"; the middleware knows its own failure and swallows it.
    recorder = await call_http(app, "/", method="POST")

    assert recorder.status == 500
    assert recorder.types() == ["http.response.start", "http.response.body"]
    assert ran == []
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_a_background_task_runs_after_the_response_with_a_session_of_its_own(
    db: Database,
) -> None:
    sent: list[Message] = []
    seen: dict[str, Any] = {}

    async def record() -> None:
        seen["sent when the task started"] = [m["type"] for m in sent]
        seen["task session"] = db.session
        await add_key(db, "background")

    @post("/", status_code=201)
    async def handler() -> Response[str]:
        await add_key(db, "request")
        seen["request session"] = db.session
        return Response("created", status_code=201, background=BackgroundTask(record))

    app = SQLAlchemyMiddleware(Litestar([handler]), db)

    recorder = await call_http(app, "/", method="POST", on_send=sent.append)

    assert recorder.status == 201
    assert seen["sent when the task started"] == ["http.response.start", "http.response.body"]
    assert seen["task session"] is not seen["request session"]
    assert await keys(db) == {"request", "background"}
    assert checked_out(db) == 0


async def test_an_http_exception_decides_the_outcome_by_its_status(db: Database) -> None:
    @get("/{key:str}")
    async def handler(key: FromPath[str]) -> str:
        await add_key(db, key)
        raise NotFoundException("nothing here")

    app = SQLAlchemyMiddleware(Litestar([handler]), db)

    recorder = await call_http(app, "/written")

    assert recorder.status == 404
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_as_a_litestar_middleware_it_never_sees_lifespan(db: Database) -> None:
    # Why the example wraps the application object: Litestar's middleware runs per
    # route, so the engine is neither started at startup nor disposed at shutdown.
    @get("/")
    async def handler() -> str:
        await add_key(db, "works")
        return "ok"

    app = Litestar([handler], middleware=[lambda app: SQLAlchemyMiddleware(app, db)])
    await db.dispose()  # start from no engine, as a server process would
    incoming: asyncio.Queue[Message] = asyncio.Queue()
    answered: asyncio.Queue[str] = asyncio.Queue()

    async def send(message: Message) -> None:
        answered.put_nowait(message["type"])

    lifespan: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(as_asgi_app(app), lifespan, incoming.get, send)
            incoming.put_nowait({"type": "lifespan.startup"})
            assert await answered.get() == "lifespan.startup.complete"
            engine_after_startup = started_engine(db)
            assert (await call_http(as_asgi_app(app), "/")).status == 200  # the engine starts here
            incoming.put_nowait({"type": "lifespan.shutdown"})
            assert await answered.get() == "lifespan.shutdown.complete"
            engine_after_shutdown = started_engine(db)

    assert engine_after_startup is None
    assert engine_after_shutdown is not None  # left for someone else to dispose
    assert await keys(db) == {"works"}
