"""The middleware under a real server: uvicorn in a subprocess, over real sockets.

One server per backend for the whole module (``apps/uvicorn_app.py``, started by
``_servers.serve`` with the database in ``DATABASE_URL``); the last test stops it.
Committed rows are read over a separate synchronous connection, never through the server.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from httpx_ws import WebSocketSession, connect_ws

import _postgres
from _helpers import pg_backends
from _servers import Server, serve


@dataclass
class Served:
    server: Server
    committed_keys: Callable[[], set[str]]
    #: Autocommit psycopg connection to the server's database (PostgreSQL only).
    admin: Any

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, timeout=10)


def eventually(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Poll ``check`` until it is true or ``seconds`` have passed; return its last result."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # polling interval, bounded by the deadline
    return True


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("asyncpg", marks=pytest.mark.postgresql)]
)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    cleanup: list[Callable[[], None]] = []
    admin: Any = None
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("uvicorn-sqlite") / "app.db"
        url = f"sqlite+aiosqlite:///{path}"

        def committed_keys() -> set[str]:
            with contextlib.closing(sqlite3.connect(path)) as connection:
                return {key for (key,) in connection.execute("SELECT key FROM items")}

    else:
        factory: _postgres.DatabaseFactory = request.getfixturevalue("_postgres_databases")
        database = factory.create()
        cleanup.append(lambda: factory.drop(database))
        url = database.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        admin = _postgres.connect(database)
        cleanup.append(admin.close)

        def committed_keys() -> set[str]:
            return {key for (key,) in admin.execute("SELECT key FROM items")}

    try:
        with serve(
            "tests.apps.uvicorn_app:app",
            "uvicorn",
            env={"DATABASE_URL": url},
            ready_path="/health",
        ) as server:
            yield Served(server, committed_keys, admin)
    finally:
        for step in reversed(cleanup):
            step()


def assert_no_transaction_left_open(served: Served) -> None:
    if served.admin is not None:
        assert eventually(
            lambda: all(state == "idle" for _, state, _ in pg_backends(served.admin))
        ), pg_backends(served.admin)


def test_a_created_item_is_committed_when_the_201_arrives(served: Served) -> None:
    with served.client() as client:
        response = client.post("/items/created/201")

    assert response.status_code == 201
    assert "created" in served.committed_keys()
    assert_no_transaction_left_open(served)


def test_a_400_response_rolls_back(served: Served) -> None:
    with served.client() as client:
        response = client.post("/items/refused/400")

    assert response.status_code == 400
    assert "refused" not in served.committed_keys()
    assert_no_transaction_left_open(served)


def test_a_failed_deferred_commit_answers_500_and_logs_why(served: Served) -> None:
    with served.client() as client:
        response = client.post("/orphans/orphaned")

    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert "orphaned" not in served.committed_keys()
    log = served.server.log
    assert "ERROR asgi_sqla: The transaction failed to commit" in log
    assert "instead of the app's 201" in log
    assert "Traceback" in log
    assert "IntegrityError" in log or "ForeignKeyViolation" in log
    assert_no_transaction_left_open(served)

    # The server carries on.
    with served.client() as client:
        assert client.post("/items/after-the-failure/201").status_code == 201
    assert "after-the-failure" in served.committed_keys()


def test_a_streaming_body_writes_after_the_response_started(served: Served) -> None:
    with served.client() as client:
        response = client.get("/stream/streamed")

    assert response.status_code == 200
    assert response.text == "one;two;"
    # Committed when the app returns, which may be just after the client read the end.
    assert eventually(lambda: "streamed" in served.committed_keys())
    assert_no_transaction_left_open(served)


def test_a_websocket_commits_while_the_app_waits_for_the_next_message(served: Served) -> None:
    with served.client() as client:
        connection: contextlib.AbstractContextManager[WebSocketSession] = connect_ws(
            f"{served.server.url}/ws", client
        )
        with connection as websocket:
            websocket.send_text("ws-1")
            assert websocket.receive_text() == "stored ws-1"
            websocket.send_text("ws-2")
            assert websocket.receive_text() == "stored ws-2"
            # ws-1 was committed when the app went back to receive(), before it read ws-2.
            assert "ws-1" in served.committed_keys()
            # ws-2 commits as soon as the app waits again, while the socket stays open.
            assert eventually(lambda: "ws-2" in served.committed_keys())
            assert_no_transaction_left_open(served)


def test_sigint_runs_the_app_shutdown_then_disposes_the_engine_and_exits_0(
    served: Served,
) -> None:
    served.server.process.send_signal(signal.SIGINT)
    returncode = served.server.process.wait(timeout=20)
    log = served.server.log

    assert returncode == 0, log
    app_shutdown = log.index("INFO uvicorn_app: app shutdown begins")
    disposed = log.index("Pool disposed", app_shutdown)
    assert log.index("Application shutdown complete", disposed) > disposed
    assert "Traceback" not in log[app_shutdown:]
    if served.admin is not None:
        assert eventually(lambda: pg_backends(served.admin) == [])
