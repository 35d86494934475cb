"""What the ``test_framework_*.py`` modules share: the example app in a real server.

Each of those modules runs one ``examples/<framework>_app.py`` once per (database,
server) pair, talks to it over HTTP and websockets and reads the committed rows
through a connection of its own.  The fixtures that start the server and the client,
and the helpers that read the example's ``notes`` and ``events`` tables, are the same
for every framework, so they live here; what a framework does differently stays in
its module.

A module declares its fixtures by assigning what the factories return::

    TARGET = "examples.starlette_app:app"

    server_name = server_name_fixture()
    server = example_server_fixture(TARGET)
    client = client_fixture()

(Factories rather than imported fixtures: a test argument named like an imported
fixture reads to ruff as a redefinition of an unused import.)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from _helpers import eventually, query, server_backends, server_logging_env
from _servers import SERVERS, Server, serve, server_available

#: What asgi_sqla logs when the commit after a successful response fails.
COMMIT_FAILED = "ERROR asgi_sqla: The transaction failed to commit"
#: What ``sqlalchemy.pool`` logs (see ``server_logging_env``) when the middleware
#: disposes the engine: disposed, not merely dropped by the exiting process.
POOL_DISPOSED = "INFO sqlalchemy.pool.impl.AsyncAdaptedQueuePool: Pool disposed"
#: How each server exits when the app answers ``lifespan.startup.failed``: hypercorn
#: 0.18 logs the failure but exits with 0.
STARTUP_FAILURE_EXIT_CODES = {"uvicorn": 3, "hypercorn": 0, "granian": 1}

# The type ``pytest.fixture(...)`` returns; pytest does not export a name for it.
Fixture = Any


def server_name_fixture() -> Fixture:
    """A module-scoped ``server_name`` fixture: each of ``SERVERS`` that is installed.

    Module-scoped so that ``server`` (which depends on it) starts one process per
    server for the whole module; a server that is not installed skips its tests.
    """

    @pytest.fixture(scope="module", params=SERVERS, name="server_name")
    def server_name(request: pytest.FixtureRequest) -> str:
        name: str = request.param
        if not server_available(name):
            pytest.skip(f"{name} is not installed")
        return name

    return server_name


def example_server_fixture(target: str) -> Fixture:
    """A module-scoped ``server`` fixture running ``target`` under ``server_name``.

    The app reads its database from ``DATABASE_URL`` (``module_database_url``), and
    the server logs ``asgi_sqla`` and ``sqlalchemy.pool`` lines (``server_logging_env``)
    for the tests to read in ``Server.log``.  One process serves the whole module, so
    the tests share its database; the module's last server test may stop it.
    """
    app_module = target.partition(":")[0].rpartition(".")[2]

    @pytest.fixture(scope="module", name="server")
    def server(
        server_name: str, module_database_url: str, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Server]:
        env = {
            "DATABASE_URL": module_database_url,
            **server_logging_env(tmp_path_factory.mktemp(f"{app_module}-{server_name}")),
        }
        with serve(target, server_name, env=env, ready_path="/notes") as running:
            yield running

    return server


def client_fixture() -> Fixture:
    """A ``client`` fixture: an ``httpx.Client`` for the module's ``server``.

    Function-scoped so that no connection or cookie carries over between tests; the
    timeout bounds a test whose server stopped answering.
    """

    @pytest.fixture(name="client")
    def client(server: Server) -> Iterator[httpx.Client]:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            yield client

    return client


def unique(label: str) -> str:
    """``label`` with a random suffix: the tests share a database, so each writes its own texts."""
    return f"{label}-{uuid.uuid4().hex[:12]}"


def notes_with_text(url: str, text: str) -> int:
    """How many committed rows of the example's ``notes`` table hold ``text``."""
    return int(query(url, f"SELECT count(*) FROM notes WHERE text = '{text}'")[0][0])


def events(url: str) -> list[str]:
    """The committed messages of the example's ``events`` table (written by its tasks)."""
    return [message for (message,) in query(url, "SELECT message FROM events")]


def event_mentions(url: str, text: str) -> bool:
    """True if a committed event mentions ``text``: its task ran and committed."""
    return any(text in message for message in events(url))


def no_transaction_left_open(url: str) -> bool:
    """True at once on SQLite; on PostgreSQL once no backend is idle in a transaction."""
    if not url.startswith("postgresql"):
        return True
    return eventually(lambda: all(state == "idle" for _, state, _ in server_backends(url)))
