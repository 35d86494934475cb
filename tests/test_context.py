"""How code finds the request's sessions: the contextvar, the ASGI scope, and their limits."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_sqla import (
    SCOPE_KEY,
    Database,
    NoSessionContextError,
    SessionContext,
    SessionEndedError,
    SQLAlchemyMiddleware,
)
from asgi_sqla.types import Message, Receive, Scope, Send

from _helpers import (
    add_key,
    call_http,
    checked_out,
    create_tables,
    http_scope,
    items,
    keys,
    plain_response,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    """For behaviour that does not depend on the backend."""
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'context.db'}")
    await create_tables(database)
    try:
        yield database
    finally:
        await database.dispose()


class PoolAtStart:
    """An ``on_send`` hook: the pool's checked-out count when the server gets the start."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.checked_out: int | None = None

    def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.checked_out = checked_out(self.db)


def test_db_session_outside_any_context_names_the_middleware_and_db_scope() -> None:
    db = Database("sqlite+aiosqlite:///never-created.db")

    with pytest.raises(NoSessionContextError) as info:
        _ = db.session

    message = str(info.value)
    assert "SQLAlchemyMiddleware" in message
    assert "db.scope()" in message


@pytest.mark.parametrize("request_used_the_session", [False, True], ids=["untouched", "used"])
async def test_a_task_outliving_the_request_gets_session_ended_error_from_db_session(
    db: Database, request_used_the_session: bool
) -> None:
    request_over = anyio.Event()
    errors: list[BaseException] = []
    late_tasks: list[asyncio.Task[None]] = []

    async def fire_and_forget() -> None:
        await request_over.wait()
        try:
            await add_key(db, "late")
        except Exception as exc:
            errors.append(exc)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        late_tasks.append(asyncio.create_task(fire_and_forget()))
        if request_used_the_session:
            await add_key(db, "during")
        await plain_response(send, 201)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))
    assert recorder.status == 201

    request_over.set()
    with anyio.fail_after(5):
        await late_tasks[0]

    [error] = errors
    assert isinstance(error, SessionEndedError)
    assert "db.scope()" in str(error)
    assert checked_out(db) == 0
    assert await keys(db) == ({"during"} if request_used_the_session else set())


async def test_a_task_keeping_a_session_from_before_the_response_cannot_use_it_afterwards(
    db: Database,
) -> None:
    first_write_done = anyio.Event()
    request_over = anyio.Event()
    errors: list[BaseException] = []
    late_tasks: list[asyncio.Task[None]] = []

    async def keeps_the_session() -> None:
        session = db.session
        await session.execute(items.insert().values(key="during"))
        first_write_done.set()
        await request_over.wait()
        try:
            await session.execute(items.insert().values(key="late"))
        except Exception as exc:
            errors.append(exc)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        late_tasks.append(asyncio.create_task(keeps_the_session()))
        await first_write_done.wait()
        await plain_response(send, 201)

    pool = PoolAtStart(db)
    recorder = await call_http(SQLAlchemyMiddleware(app, db), on_send=pool)
    assert recorder.status == 201
    assert pool.checked_out == 0
    request_over.set()
    with anyio.fail_after(5):
        await late_tasks[0]

    [error] = errors
    assert isinstance(error, SessionEndedError)
    assert checked_out(db) == 0
    assert await keys(db) == {"during"}


async def test_session_context_from_scope_is_the_context_behind_db_session(
    sqlite_db: Database,
) -> None:
    db = sqlite_db
    seen: dict[str, bool] = {}

    async def endpoint(request: Request) -> Response:
        context = SessionContext.from_scope(request.scope)
        seen["same context"] = context is SessionContext.current()
        seen["same session"] = context.session(db) is db.session
        seen["stored under SCOPE_KEY"] = request.scope[SCOPE_KEY] is context
        return PlainTextResponse("ok")

    app = SQLAlchemyMiddleware(Starlette(routes=[Route("/", endpoint)]), db)
    recorder = await call_http(app)

    assert recorder.status == 200
    assert seen == {"same context": True, "same session": True, "stored under SCOPE_KEY": True}


@pytest.mark.parametrize(
    "scope",
    [http_scope(), {**http_scope(), SCOPE_KEY: "not a context"}],
    ids=["missing", "not-a-context"],
)
def test_from_scope_without_the_middleware_raises_no_session_context_error(scope: Scope) -> None:
    with pytest.raises(NoSessionContextError) as info:
        SessionContext.from_scope(scope)

    assert "SQLAlchemyMiddleware" in str(info.value)


async def test_bind_makes_db_session_work_in_a_callback_run_without_the_request_context(
    sqlite_db: Database,
) -> None:
    db = sqlite_db
    outcome: dict[str, object] = {}

    def callback(context: SessionContext, request_session: AsyncSession) -> None:
        outcome["unbound"] = _session_or_error(db)
        with context.bind():
            outcome["bound"] = db.session is request_session
        outcome["after bind"] = _session_or_error(db)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        context = SessionContext.from_scope(scope)
        request_session = db.session
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def run() -> None:
            try:
                callback(context, request_session)
            finally:
                done.set_result(None)

        loop.call_soon(run, context=contextvars.Context())
        await done
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert outcome == {
        "unbound": NoSessionContextError,
        "bound": True,
        "after bind": NoSessionContextError,
    }


async def test_bind_makes_db_session_work_in_a_task_created_with_an_empty_context(
    db: Database,
) -> None:
    outcome: dict[str, object] = {}

    async def work(context: SessionContext) -> None:
        outcome["unbound"] = _session_or_error(db)
        with context.bind():
            await add_key(db, "bound")
        outcome["after bind"] = _session_or_error(db)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        context = SessionContext.from_scope(scope)
        # Context().run makes create_task copy an empty context (also on Python 3.10,
        # where create_task has no context= argument).
        task = contextvars.Context().run(asyncio.create_task, work(context))
        await task
        await plain_response(send, 201)

    pool = PoolAtStart(db)
    recorder = await call_http(SQLAlchemyMiddleware(app, db), on_send=pool)

    assert recorder.status == 201
    assert outcome == {"unbound": NoSessionContextError, "after bind": NoSessionContextError}
    assert pool.checked_out == 0
    assert await keys(db) == {"bound"}


def _session_or_error(db: Database) -> object:
    """``db.session``'s error type, or "a session" when it returned one."""
    try:
        _ = db.session
    except Exception as exc:
        return type(exc)
    return "a session"


class Passthrough(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


class TaskRecorder:
    """A raw ASGI wrapper recording the task the middleware runs in."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.task: asyncio.Task[object] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.task = asyncio.current_task()
        await self.app(scope, receive, send)


@pytest.mark.parametrize(("status", "committed"), [(201, True), (400, False)])
async def test_a_session_first_opened_below_base_http_middleware_is_ended_by_the_middleware(
    db: Database, status: int, committed: bool
) -> None:
    endpoint_tasks: list[asyncio.Task[object] | None] = []

    async def write(request: Request) -> Response:
        endpoint_tasks.append(asyncio.current_task())
        await add_key(db, "below")
        return PlainTextResponse("done", status_code=request.path_params["status"])

    starlette = Starlette(
        routes=[Route("/write/{status:int}", write, methods=["POST"])],
        middleware=[Middleware(Passthrough)],
    )
    outer = TaskRecorder(starlette)
    pool = PoolAtStart(db)
    recorder = await call_http(
        SQLAlchemyMiddleware(outer, db), f"/write/{status}", method="POST", on_send=pool
    )

    assert recorder.status == status
    assert recorder.body == b"done"
    # The premise: BaseHTTPMiddleware ran the endpoint in a task of its own.
    assert endpoint_tasks[0] is not outer.task
    assert pool.checked_out == 0
    assert checked_out(db) == 0
    assert await keys(db) == ({"below"} if committed else set())


@pytest.mark.parametrize("spawn", ["asyncio-task", "anyio-task-group"])
@pytest.mark.parametrize(("status", "committed"), [(201, True), (400, False)])
async def test_a_session_first_opened_in_a_child_task_is_ended_by_the_middleware(
    db: Database, spawn: str, status: int, committed: bool
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if spawn == "asyncio-task":
            await asyncio.create_task(add_key(db, "child"))
        else:
            async with anyio.create_task_group() as group:
                group.start_soon(add_key, db, "child")
        await plain_response(send, status)

    pool = PoolAtStart(db)
    recorder = await call_http(SQLAlchemyMiddleware(app, db), on_send=pool)

    assert recorder.status == status
    assert pool.checked_out == 0
    assert checked_out(db) == 0
    assert await keys(db) == ({"child"} if committed else set())


async def test_sequential_requests_in_one_task_do_not_share_a_session(db: Database) -> None:
    sessions: list[AsyncSession] = []
    tasks: list[asyncio.Task[object] | None] = []
    marked_on_arrival: list[bool] = []
    pending_seen: list[set[str]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        tasks.append(asyncio.current_task())
        session = db.session
        sessions.append(session)
        marked_on_arrival.append("marked" in session.info)
        session.info["marked"] = True
        pending_seen.append(set((await session.scalars(select(items.c.key))).all()))
        if scope["path"] == "/first":
            await add_key(db, "first")  # left uncommitted: the response is a 400
            await plain_response(send, 400)
        else:
            await plain_response(send, 200)

    transport = httpx.ASGITransport(app=SQLAlchemyMiddleware(app, db))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        first = await client.get("/first")
        # Nothing of the first request's context is left in the caller's context.
        assert _session_or_error(db) is NoSessionContextError
        second = await client.get("/second")
        assert _session_or_error(db) is NoSessionContextError

    assert (first.status_code, second.status_code) == (400, 200)
    assert tasks[0] is tasks[1]  # the premise: both requests ran in this very task
    assert sessions[0] is not sessions[1]
    assert marked_on_arrival == [False, False]
    assert pending_seen == [set(), set()]
    assert checked_out(db) == 0
    assert await keys(db) == set()


async def test_a_database_not_passed_to_the_middleware_names_the_fix(sqlite_db: Database) -> None:
    db = sqlite_db
    other = Database("postgresql+asyncpg://someone:hunter2@db.invalid/other")
    errors: list[Exception] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "managed")
        try:
            _ = other.session
        except Exception as exc:
            errors.append(exc)
        await plain_response(send, 201)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 201
    [error] = errors
    assert isinstance(error, NoSessionContextError)
    message = str(error)
    assert "SQLAlchemyMiddleware(app, " in message
    assert repr(other) in message
    assert "db.scope()" in message
    assert "hunter2" not in message
    # The managed database was not disturbed by the mistake.
    assert await keys(db) == {"managed"}
    assert checked_out(db) == 0
