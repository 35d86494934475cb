"""Several worker processes: each has its own engine and pool, keeps the promises, disposes it.

``tests/apps/workers_app.py`` (``db = Database()`` at module level) is served on a new
PostgreSQL database by two workers, three ways: ``uvicorn --workers 2`` (which spawns
its workers: each imports the app), ``gunicorn -w 2`` with uvicorn workers (which forks
them, then each imports the app) and ``gunicorn -w 2 --preload`` (the master imports the
app, then forks: the case a module-level engine, and its pool, would break).  The tests
of one server run in order and the last stops it.

Which process did what is read from the database and the responses, never guessed: every
connection the app opens is named ``workers_app-<pid of the process that opened it>``
(``pg_stat_activity.application_name``), every response carries ``x-worker-pid``, and
log lines carry the pid.  ``id()`` of an engine is compared within one worker only: two
processes forked from one parent may well give different objects the same address.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import URL

import _postgres
from _helpers import eventually, pg_backends
from _servers import ROOT, Server, serve, server_available

pytestmark = [
    pytest.mark.postgresql,
    pytest.mark.skipif(
        not (server_available("gunicorn") and server_available("uvicorn_worker")),
        reason="gunicorn and uvicorn-worker are in the dev group: pip install gunicorn "
        "uvicorn-worker",
    ),
]

#: How each case starts two workers: (server, extra arguments).
SERVERS = {
    "uvicorn-workers": ("uvicorn", ("--workers", "2")),
    "gunicorn": ("gunicorn", ("--workers", "2")),
    "gunicorn-preload": ("gunicorn", ("--workers", "2", "--preload")),
}

#: The app's tables (tests/apps/workers_app.py), made here before the workers start: two
#: workers running ``create_all`` at once would race.  The test process never imports
#: the app, whose connect hook would apply to every engine of the process.
SCHEMA = (
    "CREATE TABLE items (id serial PRIMARY KEY, key varchar(64) NOT NULL UNIQUE)",
    "CREATE TABLE parents (id integer PRIMARY KEY)",
    "CREATE TABLE children (id serial PRIMARY KEY, parent_id integer NOT NULL "
    "REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)",
)

_CONNECTIONS = (
    "SELECT pid, application_name, state FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
    "AND backend_type = 'client backend'"
)
_STARTED = re.compile(r"^INFO (\d+) workers_app: startup done$", re.MULTILINE)


@dataclass
class Workers:
    server: Server
    #: Autocommit psycopg connection to the app's database.
    admin: Any
    #: The workers' pids, from their lifespan startup lines.
    pids: set[int] = field(default_factory=set)

    @property
    def master(self) -> int:
        return self.server.process.pid

    def connections(self) -> list[tuple[int, str, str | None]]:
        """``(backend pid, application_name, state)`` of every connection to the database."""
        return [(int(pid), name, state) for pid, name, state in self.admin.execute(_CONNECTIONS)]

    def committed(self, keys: set[str]) -> set[str]:
        rows = self.admin.execute("SELECT key FROM items WHERE key = ANY(%s)", (list(keys),))
        return {key for (key,) in rows}


def named(pid: int) -> str:
    """The ``application_name`` of the connections opened by the process ``pid``."""
    return f"workers_app-{pid}"


@pytest.fixture(scope="module", params=list(SERVERS))
def workers(
    request: pytest.FixtureRequest, _postgres_databases: _postgres.DatabaseFactory
) -> Iterator[Workers]:
    server_name, args = SERVERS[request.param]
    database: URL = _postgres_databases.create()
    admin = _postgres.connect(database)
    try:
        for statement in SCHEMA:
            admin.execute(statement)
        url = database.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        with serve(
            "tests.apps.workers_app:app",
            server_name,
            env={"DATABASE_URL": url},
            ready_path="/health",  # no database: opens no connection
            args=args,
        ) as server:
            running = Workers(server, admin)

            def both_started() -> bool:
                running.pids = {int(pid) for pid in _STARTED.findall(server.log)}
                return len(running.pids) == 2

            assert eventually(both_started, seconds=20), server.log
            yield running
    finally:
        admin.close()
        _postgres_databases.drop(database)


def from_every_worker(
    workers: Workers, request: Callable[[], httpx.Response], seconds: float = 15.0
) -> dict[int, list[httpx.Response]]:
    """Send ``request`` (a new connection each time) until every worker has answered it.

    Which worker accepts a connection is the kernel's choice; a handful of requests
    reaches both in practice, and the deadline bounds the loop.
    """
    answers: dict[int, list[httpx.Response]] = {}

    def every_worker_answered() -> bool:
        response = request()
        answers.setdefault(int(response.headers["x-worker-pid"]), []).append(response)
        return set(answers) == workers.pids

    assert eventually(every_worker_answered, seconds=seconds), (answers, workers.pids)
    return answers


def test_before_the_first_request_only_the_workers_startup_checks_are_connected(
    workers: Workers,
) -> None:
    # Neither the import of the app (by the master too, with --preload) nor the fork
    # opened a connection: each worker's startup check opened one, left in its pool.
    assert workers.master not in workers.pids
    connections = workers.connections()
    assert sorted(name for _, name, _ in connections) == sorted(map(named, workers.pids))
    assert all(state == "idle" for _, _, state in connections), connections


def test_each_worker_has_its_own_engine_and_its_own_connections(workers: Workers) -> None:
    def whoami() -> httpx.Response:
        return httpx.get(f"{workers.server.url}/whoami", timeout=10)

    answers = from_every_worker(workers, whoami)
    # A few more, so that each worker answers several times.
    for _ in range(10):
        response = whoami()
        answers[int(response.headers["x-worker-pid"])].append(response)

    backends: dict[int, set[int]] = {}
    for pid, responses in answers.items():
        bodies = [response.json() for response in responses]
        assert {body["pid"] for body in bodies} == {pid}
        # One engine and one pool for the life of the worker.
        assert len({body["engine"] for body in bodies}) == 1, bodies
        assert len({body["pool"] for body in bodies}) == 1, bodies
        # Every connection the worker used, it opened itself: none came through fork.
        assert {body["application_name"] for body in bodies} == {named(pid)}
        backends[pid] = {body["backend"] for body in bodies}
    first, second = backends.values()
    assert not first & second, backends  # no backend connection serves two workers

    names = {backend: name for backend, name, _ in workers.connections()}
    for pid, used in backends.items():
        assert {names.get(backend) for backend in used} == {named(pid)}, (names, backends)


def test_a_failed_commit_is_a_500_in_every_worker_and_commits_nothing(workers: Workers) -> None:
    keys: set[str] = set()

    def orphan() -> httpx.Response:
        key = f"orphan-{uuid.uuid4().hex}"
        keys.add(key)
        return httpx.post(f"{workers.server.url}/orphans/{key}", timeout=10)

    answers = from_every_worker(workers, orphan)

    statuses = {pid: {r.status_code for r in responses} for pid, responses in answers.items()}
    assert statuses == {pid: {500} for pid in workers.pids}
    assert workers.committed(keys) == set()
    log = workers.server.log
    for pid in workers.pids:
        assert f"ERROR {pid} asgi_sqla: The transaction failed to commit" in log
    assert eventually(lambda: all(state == "idle" for _, _, state in workers.connections())), (
        workers.connections()
    )


def test_a_201_from_every_worker_is_committed(workers: Workers) -> None:
    keys: set[str] = set()

    def create() -> httpx.Response:
        key = f"item-{uuid.uuid4().hex}"
        keys.add(key)
        return httpx.post(f"{workers.server.url}/items/{key}", timeout=10)

    answers = from_every_worker(workers, create)

    statuses = {pid: {r.status_code for r in responses} for pid, responses in answers.items()}
    assert statuses == {pid: {201} for pid in workers.pids}
    # Committed before the 201 was sent: read at once, no polling.
    assert workers.committed(keys) == keys


def test_sigterm_to_the_master_disposes_every_workers_pool_and_exits_0(
    workers: Workers,
) -> None:
    assert {name for _, name, _ in workers.connections()} == set(map(named, workers.pids))

    workers.server.process.send_signal(signal.SIGTERM)
    returncode = workers.server.process.wait(timeout=30)
    log = workers.server.log

    assert returncode == 0, log
    first_shutdown = min(log.index(f"{pid} workers_app: shutdown begins") for pid in workers.pids)
    assert "Traceback" not in log[first_shutdown:], log  # (the failed commits log theirs)
    for pid in workers.pids:
        # The app's shutdown, then the middleware disposes this worker's pool.
        shutdown = log.index(f"INFO {pid} workers_app: shutdown begins")
        disposed = re.compile(rf"^INFO {pid} sqlalchemy\.pool\S*: Pool disposed", re.MULTILINE)
        assert disposed.search(log, shutdown), log
    assert log.count("Application shutdown complete") == 2, log
    assert eventually(lambda: pg_backends(workers.admin) == []), pg_backends(workers.admin)


def test_importing_the_app_creates_no_engine_and_opens_no_connection(
    postgres_database: URL, pg_admin: Any
) -> None:
    # What gunicorn --preload does in the master before it forks: import the app.  The
    # child process stops after the import until it is told to exit (its stdin closes).
    url = postgres_database.set(drivername="postgresql+asyncpg")
    script = (
        "import gc, sys\n"
        "from sqlalchemy import Engine\n"
        "from sqlalchemy.ext.asyncio import AsyncEngine\n"
        "from sqlalchemy.pool import Pool\n"
        "import tests.apps.workers_app\n"
        "gc.collect()\n"
        "alive = [o for o in gc.get_objects() if isinstance(o, (Engine, AsyncEngine, Pool))]\n"
        "print(len(alive), flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={
            **os.environ,
            "DATABASE_URL": url.render_as_string(hide_password=False),
            "PYTHONPATH": str(ROOT),
        },
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:  # leaving the block closes its stdin, and waits for it
        assert child.stdout is not None
        engines = child.stdout.readline().strip()
        connections = pg_backends(pg_admin)

    assert engines == "0"
    assert connections == []
    assert child.returncode == 0
