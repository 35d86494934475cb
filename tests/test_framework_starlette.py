"""Starlette: ``examples/starlette_app.py`` in real servers, and sync endpoints in-process.

The example runs once per (database, server) pair: ``module_database_url`` (SQLite,
PostgreSQL through asyncpg) times uvicorn, hypercorn and granian, in a process started
by ``tests/_servers.py``.  The tests talk to it over HTTP and websockets and read the
committed rows through a connection of their own.  They share the database, so each
writes texts no other test writes.  The last server test stops the server.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator

import anyio
import anyio.from_thread
import httpx
import pytest
from httpx_ws import connect_ws
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_sqla import ConfigurationError, Database, SQLAlchemyMiddleware
from asgi_sqla.types import Message

from _framework import (
    COMMIT_FAILED,
    POOL_DISPOSED,
    client_fixture,
    events,
    example_server_fixture,
    no_transaction_left_open,
    notes_with_text,
    server_name_fixture,
    unique,
)
from _helpers import (
    add_key,
    call_http,
    checked_out,
    create_tables,
    eventually,
    keys,
    server_backends,
    server_reported_an_app_error,
)
from _servers import Server

pytestmark = pytest.mark.anyio

TARGET = "examples.starlette_app:app"


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


def test_a_422_rolls_back_the_note_the_request_inserted(
    client: httpx.Client, module_database_url: str
) -> None:
    response = client.post("/notes", json={"text": ""})

    assert response.status_code == 422
    assert response.json() == {"error": "text must not be empty"}
    assert notes_with_text(module_database_url, "") == 0
    assert no_transaction_left_open(module_database_url)


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
    assert "Traceback" in log
    assert "IntegrityError" in log or "ForeignKeyViolation" in log
    # The server carries on; the next note's background task runs, the failed one's
    # never did (it would have run right after the 500, before this request).
    response = client.post("/notes", json={"text": after})
    assert response.status_code == 201
    assert eventually(lambda: any(after in event for event in events(module_database_url)))
    assert not any(failed in event for event in events(module_database_url))
    # The server saw a valid message sequence and no exception: it reports nothing.
    assert not server_reported_an_app_error(server.log[log_start:]), server.log[log_start:]
    assert no_transaction_left_open(module_database_url)


def test_a_batch_that_raises_halfway_rolls_back_the_notes_before_the_error(
    client: httpx.Client, server: Server, module_database_url: str
) -> None:
    first, second = unique("batch-first"), unique("batch-second")
    log_start = len(server.log)

    response = client.post("/notes/batch", json=[{"text": first}, {"text": second}, {}])

    assert response.status_code == 500
    assert notes_with_text(module_database_url, first) == 0
    assert notes_with_text(module_database_url, second) == 0
    # The exception went on to the server, which logs it (after the 500 was sent).
    assert eventually(lambda: server_reported_an_app_error(server.log[log_start:]))
    assert "KeyError: 'text'" in server.log[log_start:]
    assert no_transaction_left_open(module_database_url)


def test_a_valid_batch_commits_every_note(client: httpx.Client, module_database_url: str) -> None:
    first, second = unique("batch-ok-1"), unique("batch-ok-2")

    response = client.post("/notes/batch", json=[{"text": first}, {"text": second}])

    assert response.status_code == 201
    assert [note["text"] for note in response.json()] == [first, second]
    assert notes_with_text(module_database_url, first) == 1
    assert notes_with_text(module_database_url, second) == 1


def test_the_streamed_export_reads_and_writes_with_a_session_opened_after_the_start(
    client: httpx.Client, module_database_url: str
) -> None:
    text = unique("exported")
    assert client.post("/notes", json={"text": text}).status_code == 201

    with client.stream("GET", "/notes/export") as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line]

    assert text in [line["text"] for line in lines]
    # The export's own session commits its event when the app returns.
    expected = f"exported {len(lines)} notes"
    assert eventually(lambda: expected in events(module_database_url))
    assert no_transaction_left_open(module_database_url)


def test_a_websocket_commits_each_message_while_it_waits_for_the_next(
    client: httpx.Client, server: Server, module_database_url: str
) -> None:
    first, second = unique("ws-1"), unique("ws-2")

    with connect_ws(f"{server.url}/ws", client) as websocket:
        websocket.send_text(first)
        assert websocket.receive_json()["text"] == first
        websocket.send_text(second)
        assert websocket.receive_json()["text"] == second
        # The first note was committed when the app went back to receive(), before it
        # could read the second message.
        assert notes_with_text(module_database_url, first) == 1
        # The second commits as soon as the app waits again, with the socket still open,
        # and the idle socket then holds no transaction.
        assert eventually(lambda: notes_with_text(module_database_url, second) == 1)
        assert no_transaction_left_open(module_database_url)


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


# --- Sync endpoints, in-process --------------------------------------------------------


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await create_tables(database)
    yield database
    await database.dispose()


def sync_app(db: Database) -> Starlette:
    def reads_the_session(request: Request) -> PlainTextResponse:
        db.session  # noqa: B018 - the read is the point
        return PlainTextResponse("unreachable")

    def runs_async_code_on_the_loop(request: Request) -> PlainTextResponse:
        anyio.from_thread.run(add_key, db, request.path_params["key"])
        return PlainTextResponse("stored", status_code=201)

    return Starlette(
        routes=[
            Route("/sync", reads_the_session),
            Route("/from-thread/{key}", runs_async_code_on_the_loop, methods=["POST"]),
        ],
        middleware=[Middleware(SQLAlchemyMiddleware, db)],
    )


async def test_a_sync_endpoint_reading_db_session_gets_a_clear_error_and_a_500_at_once(
    db: Database,
) -> None:
    sent: list[Message] = []

    with anyio.fail_after(10), pytest.raises(ConfigurationError) as raised:
        await call_http(sync_app(db), "/sync", on_send=sent.append)

    message = str(raised.value)
    assert "synchronous `def` endpoint or dependency" in message
    assert "make it `async def`" in message
    # ServerErrorMiddleware answered before re-raising for the server to log.
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 500
    assert checked_out(db) == 0


async def test_a_sync_endpoint_can_run_the_session_on_the_event_loop_with_from_thread(
    db: Database,
) -> None:
    with anyio.fail_after(10):
        recorder = await call_http(sync_app(db), "/from-thread/threaded", method="POST")

    assert recorder.status == 201
    assert await keys(db) == {"threaded"}
    assert checked_out(db) == 0
