"""A hand-written ASGI app: ``examples/asgi_app.py`` in real servers.

No framework between the server and the app: what the servers do with the messages
the middleware and the app send is all there is.  The example runs once per
(database, server) pair: ``module_database_url`` (SQLite, PostgreSQL through asyncpg)
times uvicorn, hypercorn and granian, in a process started by ``tests/_servers.py``.
The tests share the database, so each writes texts no other test writes.  The last
server test stops the server.  The startup-failure tests start a server of their own.
"""

from __future__ import annotations

import json
import re
import signal

import httpx
import pytest
from httpx_ws import WebSocketUpgradeError, connect_ws

from _framework import (
    COMMIT_FAILED,
    POOL_DISPOSED,
    STARTUP_FAILURE_EXIT_CODES,
    client_fixture,
    events,
    example_server_fixture,
    no_transaction_left_open,
    notes_with_text,
    server_name_fixture,
    unique,
)
from _helpers import (
    eventually,
    server_backends,
    server_reported_an_app_error,
)
from _servers import Server, free_port, serve

TARGET = "examples.asgi_app:app"

#: The body each server sends with the 500 it answers for an app that raised before
#: starting its response (the middleware has rolled back and re-raised by then).
SERVER_500_BODIES = {
    "uvicorn": "Internal Server Error",
    "hypercorn": "",
    "granian": "Internal server error",
}


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
    assert notes_with_text(module_database_url, text) == 1
    assert no_transaction_left_open(module_database_url)


def test_work_after_the_response_commits_with_a_new_session_when_the_app_returns(
    client: httpx.Client, module_database_url: str
) -> None:
    text = unique("after-response")

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
    assert "IntegrityError" in log or "ForeignKeyViolation" in log
    # send() raised CommitFailedError into the app, so its event was never written;
    # the next request's is.
    assert client.post("/notes", json={"text": after}).status_code == 201
    assert eventually(lambda: any(after in event for event in events(module_database_url)))
    assert not any(failed in event for event in events(module_database_url))
    # The middleware swallowed the CommitFailedError it raised: the server saw a
    # complete 500 and no exception.
    assert not server_reported_an_app_error(server.log[log_start:]), server.log[log_start:]
    assert no_transaction_left_open(module_database_url)


def test_an_app_that_raises_halfway_is_rolled_back_and_the_server_answers_500(
    client: httpx.Client, server: Server, server_name: str, module_database_url: str
) -> None:
    first, second = unique("batch-first"), unique("batch-second")
    log_start = len(server.log)

    response = client.post("/notes/batch", json=[{"text": first}, {"text": second}, {}])

    assert response.status_code == 500
    assert response.text == SERVER_500_BODIES[server_name]
    assert notes_with_text(module_database_url, first) == 0
    assert notes_with_text(module_database_url, second) == 0
    # The middleware re-raised the KeyError unchanged, for the server to log.
    assert eventually(lambda: server_reported_an_app_error(server.log[log_start:]))
    assert "KeyError: 'text'" in server.log[log_start:]
    assert no_transaction_left_open(module_database_url)


def test_a_valid_batch_commits_every_note(client: httpx.Client, module_database_url: str) -> None:
    first, second = unique("batch-ok-1"), unique("batch-ok-2")

    response = client.post("/notes/batch", json=[{"text": first}, {"text": second}])

    assert response.status_code == 201
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
    expected = f"exported {len(lines)} notes"
    assert eventually(lambda: expected in events(module_database_url))
    assert no_transaction_left_open(module_database_url)


def test_a_websocket_commits_each_message_while_it_waits_for_the_next(
    client: httpx.Client, server: Server, module_database_url: str
) -> None:
    first, second = unique("ws-1"), unique("ws-2")

    with connect_ws(f"{server.url}/ws", client) as websocket:
        websocket.send_text(first)
        assert json.loads(websocket.receive_text())["text"] == first
        websocket.send_text(second)
        assert json.loads(websocket.receive_text())["text"] == second
        assert notes_with_text(module_database_url, first) == 1
        assert eventually(lambda: notes_with_text(module_database_url, second) == 1)
        assert no_transaction_left_open(module_database_url)


def test_a_websocket_closed_before_accept_is_refused_with_403(
    client: httpx.Client, server: Server
) -> None:
    with (
        pytest.raises(WebSocketUpgradeError) as refused,
        connect_ws(f"{server.url}/elsewhere", client),
    ):
        pass  # pragma: no cover - the upgrade is refused

    assert refused.value.response.status_code == 403


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


# --- Startup failure, one server process per server ------------------------------------


def test_a_database_that_does_not_answer_stops_the_server_at_startup_without_its_password(
    server_name: str,
) -> None:
    url = f"postgresql+asyncpg://app:pa55word@127.0.0.1:{free_port()}/notes"

    with (
        pytest.raises(RuntimeError, match="exited with") as stopped,
        serve(TARGET, server_name, env={"DATABASE_URL": url}, ready_path="/notes"),
    ):
        pass  # pragma: no cover - the server never becomes ready

    report = str(stopped.value)
    match = re.search(r"exited with (-?\d+) before it was ready", report)
    assert match is not None, report
    assert int(match.group(1)) == STARTUP_FAILURE_EXIT_CODES[server_name], report
    assert "Database('postgresql+asyncpg://app:***@127.0.0.1" in report
    assert "did not answer at startup" in report
    assert "pa55word" not in report
