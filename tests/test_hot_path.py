"""The hot path: what ending a request costs, beyond what the promises need.

A request's session is ended (committed or rolled back, and closed) in the request's
own task, shielded from its cancellation without a task of its own
(``run_to_completion``): a task and the loop turns that wait for it were most of
what ending a one-query request cost.  The cancellation tests
(``tests/test_cancellation.py``) show that the shield still holds.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from asgi_sqla import Database, SessionEndedError, SQLAlchemyMiddleware
from asgi_sqla.types import Receive, Scope, Send

from _helpers import add_key, call_http, checked_out, keys, open_database, plain_response

pytestmark = pytest.mark.anyio

#: The tasks ending a request creates: none, but on Python 3.10, which has no
#: ``Task.cancelling()`` to shield the ending in the request's own task, the one that
#: ``run_to_completion`` runs it in (``asgi_sqla._session.run_driver_to_completion``).
ENDING_TASKS = [] if sys.version_info >= (3, 11) else ["_end"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # tasks are counted with asyncio's task factory


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await open_database(f"sqlite+aiosqlite:///{tmp_path}/hot.db")
    try:
        yield database
    finally:
        await database.dispose()


@contextmanager
def tasks_created() -> Iterator[list[str]]:
    """The names of the coroutines of the tasks the running loop creates in the block."""
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    created: list[str] = []

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        created.append(getattr(coro, "__qualname__", repr(coro)))
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        yield created
    finally:
        loop.set_task_factory(previous)


@pytest.mark.parametrize("status", [201, 400])
async def test_ending_a_request_that_wrote_creates_no_task(db: Database, status: int) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "written")
        await plain_response(send, status)

    with tasks_created() as created:
        recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == status
    assert created == ENDING_TASKS
    assert await keys(db) == ({"written"} if status == 201 else set())
    assert checked_out(db) == 0


async def test_a_session_that_never_took_a_connection_ends_without_a_task(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        db.session.info["read"] = True  # a session, and no statement
        await plain_response(send, 200)

    with tasks_created() as created:
        recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert created == ENDING_TASKS


async def test_a_session_ended_at_response_start_is_refused_to_the_same_task(
    db: Database,
) -> None:
    # The ending runs in the request's own task now: the mark that lets the package's
    # calls pass on the retired session must not outlive the ending there.
    refused: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        session = db.session
        await session.execute(text("SELECT 1"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await session.execute(text("SELECT 1"))
        except SessionEndedError as exc:
            refused.append(type(exc).__name__)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert refused == ["SessionEndedError"]
    assert checked_out(db) == 0


async def test_the_package_adds_no_per_statement_engine_event(db: Database) -> None:
    """A listener of the engine's connection events (``after_cursor_execute``...) makes
    SQLAlchemy dispatch every connection event of every statement: measured at about
    146,000 instructions a request under uvicorn.  The package's own listeners are the
    dialect's (``handle_error``, ``do_execute``) and the pool's; only ``stats=True`` and
    replicas (read-your-writes) need the engine's.  ``_has_events`` is SQLAlchemy's flag
    for exactly this (``Connection._execute_context`` tests it at each event point)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.session.execute(text("SELECT 1"))
        await plain_response(send, 200)

    assert (await call_http(SQLAlchemyMiddleware(app, db), "/")).status == 200
    assert db.engine.sync_engine._has_events is False
