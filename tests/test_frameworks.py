"""The example apps in real servers: ``examples/<framework>_app.py``, one API, five frameworks.

Every example serves the same notes API (``GET /notes``, ``POST /notes``,
``GET /notes/count``, ``GET /notes/{id}``, with the same statuses and bodies, and
``POST /notes/batch``, ``GET /notes/export``, a ``/ws`` websocket) and records events
after its responses, so one set of tests checks them all.  Each runs once per
(framework, server, database): the five examples, times uvicorn, hypercorn and granian,
times ``module_database_url`` (SQLite, PostgreSQL through asyncpg), in a process
started by ``tests/_servers.py``.
What a framework does differently (who answers an unhandled exception, what the
server logs) is a field of its :class:`Framework`; a test
that only one or two examples can pass says so with ``@pytest.mark.frameworks(...)``.

The tests talk to the server over HTTP and websockets and read the committed rows
through a connection of their own.  They share the database, so each writes texts
no other test writes.  The last server test stops the server.  What each framework
does in-process stays in ``test_framework_<name>.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from httpx_ws import WebSocketDisconnect, WebSocketSession, WebSocketUpgradeError, connect_ws

from _framework import (
    COMMIT_FAILED,
    POOL_DISPOSED,
    assert_sigint_stops_the_server_cleanly,
    event_mentions,
    events,
    no_transaction_left_open,
    notes_with_text,
    server_name_fixture,
    unique,
)
from _helpers import (
    eventually,
    query,
    server_logging_env,
    server_reported_an_app_error,
)
from _servers import Server, serve

#: The body each server sends with the 500 it answers for an app that raised before
#: starting its response (the middleware has rolled back and re-raised by then).
SERVER_500_BODIES = {
    "uvicorn": "Internal Server Error",
    "hypercorn": "",
    "granian": "Internal server error",
}


def notes_count(url: str) -> int:
    """How many notes are committed, read through a connection of the test's own."""
    return int(query(url, "SELECT count(*) FROM notes")[0][0])


#: The error body of every example, for a note it refuses.
EMPTY_TEXT = {"error": "text must not be empty"}

#: A batch item that breaks the examples' CHECK constraint: its INSERT raises IntegrityError.
TOO_LONG = {"text": "x" * 501}


@dataclass(frozen=True)
class Framework:
    """How one example app differs where the shared tests look (defaults: the common case).

    The notes API itself (routes, statuses, bodies) is the same in every example; what
    differs is what happens around it: who answers an unhandled exception, what the
    server logs.
    """

    #: The app, as ``module:attribute``.
    target: str
    #: What the server's log shows of the failed batch (``None``: nothing to look for).
    batch_failure_logged: str | None = None
    #: Whether the batch's exception reaches the server, which reports an app error.
    batch_failure_reaches_the_server: bool = False
    #: Whether the server itself answers the batch's 500 (no framework to answer it).
    server_answers_the_500: bool = False
    #: Whether each websocket note is recorded by a task held back until its commit.
    websocket_notes_are_recorded: bool = False


FRAMEWORKS = {
    "asgi": Framework(
        "examples.asgi_app:app",
        batch_failure_logged="note_text_length",
        batch_failure_reaches_the_server=True,
        server_answers_the_500=True,
    ),
    "starlette": Framework(
        "examples.starlette_app:app",
        batch_failure_logged="note_text_length",
        batch_failure_reaches_the_server=True,
    ),
    "fastapi": Framework(
        "examples.fastapi_app:app",
        batch_failure_logged="note_text_length",
        batch_failure_reaches_the_server=True,
    ),
    "litestar": Framework("examples.litestar_app:app"),
    "quart": Framework(
        "examples.quart_app:app",
        batch_failure_logged="Exception on request POST /notes/batch",
        websocket_notes_are_recorded=True,
    ),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test for every example, or for those its ``frameworks`` marker names.

    Module-scoped, and parametrized by name, so that the tests of one example share
    its server process (pytest groups the tests by the value of the parameter).
    """
    if "framework_name" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("frameworks")
    names = list(marker.args) if marker else list(FRAMEWORKS)
    metafunc.parametrize("framework_name", names, scope="module")


server_name = server_name_fixture()


@pytest.fixture(scope="module")
def module_database_owner(framework_name: str) -> str:
    """Each example gets a new database: their tables differ (constraints, columns)."""
    return framework_name


@pytest.fixture(scope="module")
def framework(framework_name: str) -> Framework:
    return FRAMEWORKS[framework_name]


@pytest.fixture(scope="module")
def server(
    framework: Framework,
    framework_name: str,
    server_name: str,
    module_database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """The example running under ``server_name``, on ``module_database_url``.

    The app reads its database from ``DATABASE_URL``, and the server logs
    ``asgi_sqla`` and ``sqlalchemy.pool`` lines (``server_logging_env``) for the tests
    to read in ``Server.log``.  One process serves the example's tests for the whole
    module; the last of them stops it.
    """
    env = {
        "DATABASE_URL": module_database_url,
        **server_logging_env(tmp_path_factory.mktemp(f"{framework_name}-{server_name}")),
    }
    with serve(framework.target, server_name, env=env, ready_path="/notes") as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    """An ``httpx.Client`` for ``server``, new for each test (no connection carries over).

    The timeout bounds a test whose server stopped answering.
    """
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


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


def test_work_after_the_response_records_the_note_with_a_session_of_its_own(
    client: httpx.Client, module_database_url: str
) -> None:
    text = unique("background")

    response = client.post("/notes", json={"text": text})

    assert response.status_code == 201
    expected = f"created note {response.json()['id']}: {text}"
    assert eventually(lambda: expected in events(module_database_url))
    assert no_transaction_left_open(module_database_url)


@pytest.mark.parametrize("body", [{"text": "   "}, {}], ids=["blank", "missing"])
def test_a_refused_note_is_rolled_back_and_its_background_work_never_runs(
    client: httpx.Client, module_database_url: str, body: dict[str, str]
) -> None:
    after = unique("after-blank")

    response = client.post("/notes", json=body)

    assert response.status_code == 422
    assert response.json() == EMPTY_TEXT
    assert notes_with_text(module_database_url, body.get("text", "")) == 0
    # A later note's work runs; the refused request's was dropped, not delayed.
    assert client.post("/notes", json={"text": after}).status_code == 201
    assert eventually(lambda: event_mentions(module_database_url, after))
    blank_events = [
        m for m in events(module_database_url) if re.fullmatch(r"created note \d+: *", m)
    ]
    assert blank_events == []
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
    # The server carries on; the next note's work after the response runs, the failed
    # one's never did (it would have run right after the 500, before this request).
    assert client.post("/notes", json={"text": after}).status_code == 201
    assert eventually(lambda: event_mentions(module_database_url, after))
    assert not event_mentions(module_database_url, failed)
    # The server saw a valid message sequence and no exception: it reports nothing
    # (Litestar re-raised the CommitFailedError as "Exception caught after response
    # started"; the middleware recognised it).
    assert not server_reported_an_app_error(server.log[log_start:]), server.log[log_start:]
    assert no_transaction_left_open(module_database_url)


def test_a_batch_failing_halfway_answers_500_and_rolls_back_the_notes_before_it(
    client: httpx.Client,
    server: Server,
    server_name: str,
    framework: Framework,
    module_database_url: str,
) -> None:
    first, second, after = unique("batch-first"), unique("batch-second"), unique("after-batch")
    log_start = len(server.log)

    batch = [{"text": first}, {"text": second}, TOO_LONG]
    response = client.post("/notes/batch", json=batch)

    assert response.status_code == 500
    if framework.server_answers_the_500:
        assert response.text == SERVER_500_BODIES[server_name]
    assert notes_with_text(module_database_url, first) == 0
    assert notes_with_text(module_database_url, second) == 0
    if framework.batch_failure_reaches_the_server:
        # The exception went on to the server, which logs it (after the 500 was sent).
        assert eventually(lambda: server_reported_an_app_error(server.log[log_start:]))
    if framework.batch_failure_logged is not None:
        assert framework.batch_failure_logged in server.log[log_start:]
    # A later note's work runs; none of the batch's notes is recorded.
    assert client.post("/notes", json={"text": after}).status_code == 201
    assert eventually(lambda: event_mentions(module_database_url, after))
    assert not event_mentions(module_database_url, first)
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
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]

    assert text in [line["text"] for line in lines]
    # The export's own session commits its event when the app returns.
    expected = f"exported {len(lines)} notes"
    assert eventually(lambda: expected in events(module_database_url))
    assert no_transaction_left_open(module_database_url)


def test_a_websocket_commits_each_message_while_it_waits_for_the_next(
    client: httpx.Client, server: Server, framework: Framework, module_database_url: str
) -> None:
    first, second = unique("ws-1"), unique("ws-2")

    websocket: WebSocketSession
    with connect_ws(f"{server.url}/ws", client) as websocket:
        websocket.send_json({"text": first})
        assert json.loads(websocket.receive_text())["text"] == first
        # No next message: the app went back to receive() after replying, which
        # commits, so the idle socket holds no transaction.
        assert eventually(lambda: notes_with_text(module_database_url, first) == 1)
        assert no_transaction_left_open(module_database_url)
        if framework.websocket_notes_are_recorded:
            # The note's background task was held back until that commit.
            assert eventually(lambda: event_mentions(module_database_url, first))
        websocket.send_json({"text": second})
        assert json.loads(websocket.receive_text())["text"] == second
        # The first was committed before the app could read the second.
        assert notes_with_text(module_database_url, first) == 1
        # The second commits as soon as the app waits again, with the socket still open.
        assert eventually(lambda: notes_with_text(module_database_url, second) == 1)
        assert no_transaction_left_open(module_database_url)


@pytest.mark.frameworks("asgi")
def test_a_websocket_closed_before_accept_is_refused_with_403(
    client: httpx.Client, server: Server
) -> None:
    with (
        pytest.raises(WebSocketUpgradeError) as refused,
        connect_ws(f"{server.url}/elsewhere", client),
    ):
        pass  # pragma: no cover - the upgrade is refused

    assert refused.value.response.status_code == 403


def test_a_body_that_is_not_json_answers_400_and_leaves_no_transaction(
    client: httpx.Client, module_database_url: str
) -> None:
    response = client.post(
        "/notes", content=b"not json", headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json() == {"error": "the body must be a JSON object with a text field"}
    assert no_transaction_left_open(module_database_url)


def test_a_note_is_read_by_id_and_a_missing_one_answers_404(client: httpx.Client) -> None:
    text = unique("by-id")
    created = client.post("/notes", json={"text": text}).json()

    found, missing = client.get(f"/notes/{created['id']}"), client.get("/notes/999999999")

    assert (found.status_code, found.json()) == (200, {"id": created["id"], "text": text})
    assert (missing.status_code, missing.json()) == (404, {"error": "no such note"})


def test_the_count_is_of_the_committed_notes(
    client: httpx.Client, module_database_url: str
) -> None:
    assert client.post("/notes", json={"text": unique("counted")}).status_code == 201

    response = client.get("/notes/count")

    assert response.status_code == 200
    assert response.json() == {"count": notes_count(module_database_url)}
    assert no_transaction_left_open(module_database_url)


@pytest.mark.frameworks("quart")
def test_a_websocket_message_whose_commit_fails_closes_the_socket_with_1011(
    client: httpx.Client, server: Server, module_database_url: str
) -> None:
    orphan = unique("ws-orphan")
    log_start = len(server.log)

    socket: WebSocketSession
    with connect_ws(f"{server.url}/ws", client) as socket:
        socket.send_json({"text": orphan, "parent_id": 999_999_999})
        assert socket.receive_json()["text"] == orphan  # the INSERT passed
        # The handler's next receive() commits; the deferred foreign key fails it.
        with pytest.raises(WebSocketDisconnect) as closed:
            socket.receive_json()

    assert closed.value.code == 1011
    assert notes_with_text(module_database_url, orphan) == 0
    assert eventually(lambda: COMMIT_FAILED in server.log[log_start:])
    assert "closed with 1011" in server.log[log_start:]
    assert not event_mentions(module_database_url, orphan)
    assert no_transaction_left_open(module_database_url)


def test_sigint_stops_the_server_cleanly_after_disposing_the_engine(
    server: Server, module_database_url: str
) -> None:
    # Keep this test last: it stops the example's server.
    assert_sigint_stops_the_server_cleanly(server, module_database_url, POOL_DISPOSED)
