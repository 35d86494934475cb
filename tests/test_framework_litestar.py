"""Litestar: ``examples/litestar_app.py`` in real servers, and the dependency in-process.

The example runs once per (database, server) pair: ``module_database_url`` (SQLite,
PostgreSQL through asyncpg) times uvicorn, hypercorn and granian, in a process started
by ``tests/_servers.py``.  The tests talk to it over HTTP and websockets and read the
committed rows through a connection of their own.  They share the database, so each
writes texts no other test writes.  The last server test stops the server.

The in-process tests check ``asgi_sqla.litestar.provide_session``, how Litestar's
handling of an exception raised from ``send()`` meets a failed commit, and why the
middleware wraps the application object rather than being a Litestar middleware.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from httpx_ws import connect_ws
from litestar import Litestar, Response, get, post
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.params import FromPath
from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_sqla import Database, SQLAlchemyMiddleware
from asgi_sqla.litestar import provide_session
from asgi_sqla.types import Message

from _framework import (
    COMMIT_FAILED,
    POOL_DISPOSED,
    client_fixture,
    event_mentions,
    events,
    example_server_fixture,
    no_transaction_left_open,
    notes_with_text,
    server_name_fixture,
    unique,
)
from _helpers import (
    PoolEvents,
    add_key,
    call_http,
    checked_out,
    eventually,
    items,
    keys,
    open_database,
    orphan_child,
    server_backends,
    server_reported_an_app_error,
)
from _servers import Server

pytestmark = pytest.mark.anyio

TARGET = "examples.litestar_app:app"


server_name = server_name_fixture()
server = example_server_fixture(TARGET)
client = client_fixture()


# --- The example in real servers -------------------------------------------------------


def test_a_created_note_is_committed_before_its_201_arrives(
    client: httpx.Client, module_database_url: str
) -> None:
    text = unique("created")

    response = client.post("/notes", json={"text": text})

    assert response.status_code == 201, response.text
    assert response.json()["text"] == text
    # Read as soon as the status arrived: the commit happened before it was sent.
    assert notes_with_text(module_database_url, text) == 1
    assert no_transaction_left_open(module_database_url)


def test_the_background_task_records_the_note_with_its_own_session_after_the_response(
    client: httpx.Client, module_database_url: str
) -> None:
    text = unique("background")

    response = client.post("/notes", json={"text": text})

    assert response.status_code == 201
    expected = f"created note {response.json()['id']}: {text}"
    assert eventually(lambda: expected in events(module_database_url))
    assert no_transaction_left_open(module_database_url)


def test_a_validation_exception_raised_after_the_insert_rolls_it_back_with_400(
    client: httpx.Client, module_database_url: str
) -> None:
    response = client.post("/notes", json={"text": "   "})

    assert response.status_code == 400
    assert response.json()["detail"] == "text must not be empty"
    assert notes_with_text(module_database_url, "   ") == 0
    assert no_transaction_left_open(module_database_url)


def test_a_body_litestar_refuses_answers_400_before_any_session_opens(
    client: httpx.Client,
) -> None:
    response = client.post("/notes", json={"parent_id": 1})

    assert response.status_code == 400
    assert "text" in response.text


def test_a_reply_to_a_missing_note_fails_at_commit_and_the_client_gets_500_not_201(
    client: httpx.Client, server: Server, module_database_url: str
) -> None:
    failed, after = unique("orphan"), unique("after-orphan")
    log_start = len(server.log)

    response = client.post("/notes", json={"text": failed, "parent_id": 999_999_999})

    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert notes_with_text(module_database_url, failed) == 0
    log = server.log[log_start:]
    assert COMMIT_FAILED in log
    assert "instead of the app's 201 response" in log
    assert "IntegrityError" in log or "ForeignKeyViolation" in log
    # The server carries on; the next note's background task runs, the failed one's
    # never did (it would have run right after the 500, before this request).
    assert client.post("/notes", json={"text": after}).status_code == 201
    assert eventually(lambda: event_mentions(module_database_url, after))
    assert not event_mentions(module_database_url, failed)
    # Litestar re-raised the CommitFailedError as "Exception caught after response
    # started"; the middleware recognised it, and the server reports nothing.
    assert not server_reported_an_app_error(server.log[log_start:]), server.log[log_start:]
    assert no_transaction_left_open(module_database_url)


def test_an_error_raised_halfway_through_a_batch_rolls_back_the_notes_before_it(
    client: httpx.Client, module_database_url: str
) -> None:
    first = unique("batch-first")

    response = client.post("/notes/batch", json=[{"text": first}, {"text": "x" * 501}])

    # Litestar's exception handling turns the IntegrityError into a 500: it rolls back.
    assert response.status_code == 500
    assert notes_with_text(module_database_url, first) == 0
    assert no_transaction_left_open(module_database_url)


def test_a_not_found_exception_answers_404(client: httpx.Client) -> None:
    response = client.get("/notes/999999999")

    assert response.status_code == 404
    assert response.json()["detail"] == "note 999999999 does not exist"


def test_the_streamed_export_reads_and_writes_with_a_session_opened_after_the_start(
    client: httpx.Client, module_database_url: str
) -> None:
    text = unique("exported")
    assert client.post("/notes", json={"text": text}).status_code == 201

    with client.stream("GET", "/notes/export") as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]

    assert text in [line["text"] for line in lines]
    # The export's own session commits its event when the app returns.
    expected = f"exported {len(lines)} notes"
    assert eventually(lambda: expected in events(module_database_url))
    assert no_transaction_left_open(module_database_url)


def test_a_websocket_listener_commits_each_message_while_it_waits_for_the_next(
    client: httpx.Client, server: Server, module_database_url: str
) -> None:
    first, second = unique("ws-1"), unique("ws-2")

    with connect_ws(f"{server.url}/ws", client) as socket:
        socket.send_text(first)
        assert socket.receive_json()["text"] == first
        # The listener went back to receive() after replying: the note commits, and
        # the idle socket then holds no transaction.
        assert eventually(lambda: notes_with_text(module_database_url, first) == 1)
        assert no_transaction_left_open(module_database_url)
        socket.send_text(second)
        assert socket.receive_json()["text"] == second
        # The first was committed before the listener could read the second.
        assert notes_with_text(module_database_url, first) == 1
        assert eventually(lambda: notes_with_text(module_database_url, second) == 1)


def test_sigint_stops_the_server_cleanly_after_disposing_the_engine(
    server: Server, module_database_url: str
) -> None:
    # Keep this test last among the server tests: it stops the module's server.
    server.process.send_signal(signal.SIGINT)
    returncode = server.process.wait(timeout=20)
    log = server.log

    assert returncode == 0, log
    # Logged by the pool itself (see server_logging_env): disposed, not merely dropped.
    assert POOL_DISPOSED in log, log
    if module_database_url.startswith("postgresql"):
        assert eventually(lambda: server_backends(module_database_url) == [])


# --- The dependency and Litestar's own handling, in-process -------------------------


@pytest.fixture(params=["sqlite", pytest.param("asyncpg", marks=pytest.mark.postgresql)])
def in_process_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database per test, SQLite or PostgreSQL through asyncpg.

    What is under test here is the framework's way of calling the app, not the driver:
    two backends are enough (``database_url`` would add psycopg).
    """
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    database: URL = request.getfixturevalue("postgres_database")
    return database.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


@pytest.fixture
async def db(in_process_url: str) -> AsyncIterator[Database]:
    database = await open_database(in_process_url)
    yield database
    await database.dispose()


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

    lifespan = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(app, lifespan, incoming.get, send)
            incoming.put_nowait({"type": "lifespan.startup"})
            assert await answered.get() == "lifespan.startup.complete"
            engine_after_startup = db._engine
            assert (await call_http(app, "/")).status == 200  # the engine starts here
            incoming.put_nowait({"type": "lifespan.shutdown"})
            assert await answered.get() == "lifespan.shutdown.complete"
            engine_after_shutdown = db._engine

    assert engine_after_startup is None
    assert engine_after_shutdown is not None  # left for someone else to dispose
    assert await keys(db) == {"works"}
