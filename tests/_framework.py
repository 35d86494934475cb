"""What the framework tests share: the example apps' tables, log lines and exit codes.

``tests/test_frameworks.py`` runs every ``examples/<framework>_app.py`` in real servers
and reads the committed rows of the examples' ``notes`` and ``events`` tables through
a connection of its own; ``test_framework_<name>.py`` start servers of their own for
a failed startup.  The helpers for both live here.

A module declares the ``server_name`` fixture by assigning what the factory returns::

    server_name = server_name_fixture()

(A factory rather than an imported fixture: a test argument named like an imported
fixture reads to ruff as a redefinition of an unused import.)
"""

from __future__ import annotations

import signal
import uuid
from typing import Any

import pytest

from _helpers import eventually, query, server_backends
from _servers import SERVERS, Server, server_available

#: What asgi_sqla logs when the commit after a successful response fails.
COMMIT_FAILED = "ERROR asgi_sqla: The transaction failed to commit"
#: What ``sqlalchemy.pool`` logs (see ``server_logging_env``) when the middleware
#: disposes the engine: disposed, not merely dropped by the exiting process.
POOL_DISPOSED = "INFO sqlalchemy.pool.impl.AsyncAdaptedQueuePool: Pool disposed"
#: The same for a ``SyncDatabase``'s engine (disposed in the package's worker thread).
SYNC_POOL_DISPOSED = "INFO sqlalchemy.pool.impl.QueuePool: Pool disposed"
#: How each server exits when the app answers ``lifespan.startup.failed``: hypercorn
#: 0.18 logs the failure but exits with 0.
STARTUP_FAILURE_EXIT_CODES = {"uvicorn": 3, "hypercorn": 0, "granian": 1}

# The type ``pytest.fixture(...)`` returns; pytest does not export a name for it.
Fixture = Any


def server_name_fixture() -> Fixture:
    """A module-scoped ``server_name`` fixture: each of ``SERVERS`` that is installed.

    Module-scoped so that a module-scoped ``server`` that depends on it starts one
    process per server; a server that is not installed skips its tests.
    """

    @pytest.fixture(scope="module", params=SERVERS, name="server_name")
    def server_name(request: pytest.FixtureRequest) -> str:
        name: str = request.param
        if not server_available(name):
            pytest.skip(f"{name} is not installed")
        return name

    return server_name


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


def assert_sigint_stops_the_server_cleanly(
    server: Server, database_url: str, pool_disposed: str
) -> None:
    """SIGINT stops ``server``: exit code 0, the pool disposed, no backend left on the database.

    ``pool_disposed`` (:data:`POOL_DISPOSED`, :data:`SYNC_POOL_DISPOSED`) is logged by
    the pool itself (see ``server_logging_env``): the middleware disposed the engine at
    shutdown, the exiting process did not merely drop it.
    """
    server.process.send_signal(signal.SIGINT)
    returncode = server.process.wait(timeout=20)
    log = server.log

    assert returncode == 0, log
    assert pool_disposed in log, log
    if database_url.startswith("postgresql"):
        assert eventually(lambda: server_backends(database_url) == [])
