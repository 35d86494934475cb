"""``SyncDatabase`` apps in real servers: ``def`` code in each framework's worker threads.

Four apps serve the routes of ``tests/apps/sync_common.py``, each running its
synchronous code the way its framework does: FastAPI (``examples/sqlmodel_app.py``,
the SQL tutorial's ``def`` endpoints and a ``def`` dependency with ``yield``, with the
shared routes added by ``tests/apps/sync_fastapi.py``), Starlette (``def`` endpoints),
Quart (``def`` views and ``run_sync``/``app.ensure_async``) and Litestar
(``sync_to_thread=True`` handlers with ``provide_session``).  Each runs in a uvicorn
or hypercorn process on loopback, on SQLite (sqlite3) or PostgreSQL through psycopg 3
used synchronously, or psycopg 2.

The matrix is kept lean: every app runs under both servers and on both databases,
but not in every combination (``COMBINATIONS``), and psycopg 2 serves one app.  One
server process per combination answers all of that combination's tests; the tests
read the committed rows through a connection of their own, and share the database,
so each writes keys of its own.  The last test stops the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from _framework import (
    COMMIT_FAILED,
    SYNC_POOL_DISPOSED,
    assert_sigint_stops_the_server_cleanly,
    no_transaction_left_open,
    unique,
)
from _helpers import (
    eventually,
    open_sync_database,
    query,
    server_backends,
    server_logging_env,
    server_reported_an_app_error,
)
from _servers import Server, serve

#: The exception line of the traceback the server logs for ``/misuse`` (the source
#: lines of the traceback name the error too, so the test looks for this one).
BLOCKING_CALL = "asgi_sqla.BlockingCallError: A synchronous Session ran a database call"


@dataclass(frozen=True)
class Combination:
    """One server process: an app of ``tests/apps/sync_<app>.py``, a server, a database."""

    app: str
    server: str
    #: ``sqlite`` (sqlite3), or the SQLAlchemy driver name of a PostgreSQL driver.
    database: str

    @property
    def id(self) -> str:
        """``fastapi-uvicorn-sqlite``, ``fastapi-hypercorn-psycopg``..."""
        return f"{self.app}-{self.server}-{self.database.rpartition('+')[2]}"


#: Each app under both servers and on both databases, in as few processes as that takes.
COMBINATIONS = (
    Combination("fastapi", "uvicorn", "sqlite"),
    Combination("fastapi", "hypercorn", "postgresql+psycopg"),
    Combination("fastapi", "uvicorn", "postgresql+psycopg2"),
    Combination("starlette", "hypercorn", "sqlite"),
    Combination("starlette", "uvicorn", "postgresql+psycopg"),
    Combination("quart", "uvicorn", "sqlite"),
    Combination("quart", "hypercorn", "postgresql+psycopg"),
    Combination("litestar", "hypercorn", "sqlite"),
    Combination("litestar", "uvicorn", "postgresql+psycopg"),
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test for every combination, or those of the apps its ``frameworks`` marker names.

    Module-scoped, so that the tests of one combination share its server process.
    """
    if "combination" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("frameworks")
    apps = set(marker.args) if marker else {c.app for c in COMBINATIONS}
    metafunc.parametrize(
        "combination",
        [
            pytest.param(
                combination,
                id=combination.id,
                marks=[pytest.mark.postgresql] if combination.database != "sqlite" else [],
            )
            for combination in COMBINATIONS
            if combination.app in apps
        ],
        scope="module",
    )


@pytest.fixture(scope="module")
def served_database_url(
    combination: Combination,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[str]:
    """A new database for the combination, with the tables of ``open_sync_database``.

    The tables are made here, before the server starts (the FastAPI example makes its
    ``hero`` table itself, at startup).
    """
    if combination.database == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sync-db') / 'test.db'}"
        open_sync_database(url).dispose()
        yield url
        return
    factory = request.getfixturevalue("_postgres_databases")
    database = factory.create()
    try:
        url = database.set(drivername=combination.database).render_as_string(hide_password=False)
        open_sync_database(url).dispose()
        yield url
    finally:
        factory.drop(database)


@pytest.fixture(scope="module")
def server(
    combination: Combination, served_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The combination's app on ``served_database_url``, logging ``asgi_sqla`` and the pool."""
    env = {
        "DATABASE_URL": served_database_url,
        **server_logging_env(tmp_path_factory.mktemp(combination.id)),
    }
    target = f"tests.apps.sync_{combination.app}:app"
    with serve(target, combination.server, env=env, ready_path="/health") as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    """A client of ``server``; the timeout bounds a test whose server stopped answering."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def items_with_key(url: str, key: str) -> int:
    """How many committed ``items`` rows hold ``key`` (0 or 1: the key is unique)."""
    return int(query(url, f"SELECT count(*) FROM items WHERE key = '{key}'")[0][0])


def pool(client: httpx.Client) -> dict[str, int]:
    """The server's pool: connections checked out now, and checkouts since it started."""
    response = client.get("/pool")
    assert response.status_code == 200, response.text
    report: dict[str, int] = response.json()
    return report


def test_a_write_answered_with_201_is_committed_before_the_status_arrives(
    client: httpx.Client, served_database_url: str
) -> None:
    key = unique("created")

    response = client.post(f"/items/{key}/201")

    assert response.status_code == 201, response.text
    # Read as soon as the status arrived, through a connection of the test's own.
    assert items_with_key(served_database_url, key) == 1
    assert pool(client)["checked_out"] == 0
    assert no_transaction_left_open(served_database_url)


def test_a_write_followed_by_a_409_is_rolled_back(
    client: httpx.Client, served_database_url: str
) -> None:
    key = unique("refused")

    response = client.post(f"/items/{key}/409")

    assert response.status_code == 409
    assert items_with_key(served_database_url, key) == 0
    assert pool(client)["checked_out"] == 0
    assert no_transaction_left_open(served_database_url)


def test_a_commit_that_fails_answers_500_and_commits_nothing(
    client: httpx.Client, server: Server, served_database_url: str
) -> None:
    key, after = unique("orphan"), unique("after-orphan")
    log_start = len(server.log)

    # The item and the orphan child are inserted; the deferred foreign key fails the COMMIT.
    response = client.post(f"/orphans/{key}")

    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert items_with_key(served_database_url, key) == 0
    log = server.log[log_start:]
    assert COMMIT_FAILED in log
    assert "instead of the app's 201 response" in log
    assert "IntegrityError" in log or "ForeignKeyViolation" in log
    # The middleware answered the 500 itself: the server saw no app error.
    assert not server_reported_an_app_error(log), log
    # The connection went back (or was discarded), and the next write commits.
    assert pool(client)["checked_out"] == 0
    assert no_transaction_left_open(served_database_url)
    assert client.post(f"/items/{after}/201").status_code == 201
    assert items_with_key(served_database_url, after) == 1


def test_a_request_that_never_touches_the_database_checks_out_no_connection(
    client: httpx.Client,
) -> None:
    before = pool(client)

    for _ in range(3):
        response = client.get("/health")
        assert response.status_code == 200
        assert response.json()["connections_in_use"] == 0

    assert pool(client) == before
    # The counter does see a request that uses the database: one checkout, given back.
    assert client.post(f"/items/{unique('counted')}/201").status_code == 201
    assert pool(client) == {"checked_out": 0, "checkouts": before["checkouts"] + 1}


def test_the_connection_is_back_in_the_pool_while_the_client_still_reads_the_body(
    client: httpx.Client, served_database_url: str
) -> None:
    key = unique("streamed")

    with client.stream("POST", f"/streams/{key}") as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines) == "written"
        # The body waits for the release below: the response is still going out.
        assert items_with_key(served_database_url, key) == 1  # committed before the status line
        assert pool(client)["checked_out"] == 0  # and its connection is back in the pool
        if served_database_url.startswith("postgresql"):
            # No transaction open, nothing running: every backend is idle.
            assert all(state == "idle" for _, state, _ in server_backends(served_database_url))
        assert client.post(f"/releases/{key}").status_code == 200
        assert list(lines) == ["released"]


def test_an_async_endpoint_using_the_sync_session_answers_500_and_the_log_says_why(
    client: httpx.Client, server: Server
) -> None:
    before = pool(client)
    log_start = len(server.log)

    # Not on a kept-alive connection: uvicorn closes it after an app error (even one
    # raised once the response was sent), which would reset the next request on it.
    response = client.get("/misuse", headers={"connection": "close"})

    assert response.status_code == 500
    assert eventually(lambda: BLOCKING_CALL in server.log[log_start:]), server.log[log_start:]
    # Refused before the statement reached the pool: nothing was checked out.
    assert pool(client) == before


@pytest.mark.frameworks("fastapi")
def test_the_tutorials_heroes_are_created_read_updated_and_deleted(
    client: httpx.Client, served_database_url: str
) -> None:
    name = unique("Deadpond")

    def committed_ages() -> list[int | None]:
        return [
            age
            for (age,) in query(served_database_url, f"SELECT age FROM hero WHERE name = '{name}'")
        ]

    created = client.post("/heroes/", json={"name": name, "secret_name": "Dive Wilson", "age": 30})
    assert created.status_code == 200, created.text
    hero_id = created.json()["id"]
    assert created.json() == {"name": name, "age": 30, "id": hero_id}  # HeroPublic: no secret
    assert committed_ages() == [30]  # flushed only: the middleware committed it

    assert client.get(f"/heroes/{hero_id}").json()["name"] == name
    listed = client.get("/heroes/", params={"offset": 0, "limit": 100}).json()
    assert hero_id in [hero["id"] for hero in listed]

    updated = client.patch(f"/heroes/{hero_id}", json={"age": 31})
    assert updated.status_code == 200, updated.text
    assert updated.json()["age"] == 31
    assert committed_ages() == [31]

    assert client.delete(f"/heroes/{hero_id}").json() == {"ok": True}
    assert committed_ages() == []
    assert client.get(f"/heroes/{hero_id}").status_code == 404
    assert no_transaction_left_open(served_database_url)


@pytest.mark.frameworks("fastapi")
def test_a_def_dependency_with_yield_uses_the_request_session_and_its_change_commits(
    client: httpx.Client, served_database_url: str
) -> None:
    created = client.post("/heroes/", json={"name": unique("Rusty"), "secret_name": "Tommy"})
    hero_id = created.json()["id"]

    first = client.post(f"/heroes/{hero_id}/birthday")
    second = client.post(f"/heroes/{hero_id}/birthday")

    assert (first.status_code, second.status_code) == (200, 200), second.text
    assert second.json()["age"] == 2
    assert query(served_database_url, f"SELECT age FROM hero WHERE id = {hero_id}") == [(2,)]
    missing = client.post("/heroes/999999999/birthday")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "Hero not found"}
    assert pool(client)["checked_out"] == 0
    assert no_transaction_left_open(served_database_url)


def test_sigint_stops_the_server_cleanly_after_disposing_the_engine(
    server: Server, served_database_url: str
) -> None:
    # Keep this test last: it stops the combination's server.
    assert_sigint_stops_the_server_cleanly(server, served_database_url, SYNC_POOL_DISPOSED)
