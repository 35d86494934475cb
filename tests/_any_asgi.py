"""The tests of "any ASGI app": Falcon, BlackSheep and Django, each in real servers.

``test_framework_<name>.py`` subclass the two classes here, one pair per app:

* :class:`NotesContract` runs ``examples/<name>_app.py`` and checks the common example
  contract (``GET/POST /notes``, ``/notes/count``, ``/notes/{id}``, their statuses and
  bodies), the tables its startup creates, and a clean stop.
* :class:`Promises` runs ``tests/apps/probe_<name>.py`` (the routes of
  ``tests/apps/probe_common.py``) and checks the package's three promises there: a 2xx
  is committed before its status arrives, a failed commit is a 500 with nothing
  committed, a 4xx rolls back, a request that does not use the database checks out
  no connection, the connection is back before a slow client has read the body, an
  exception in a handler is a 500 with nothing checked out, and so is a client that
  disconnects mid-request.

Each class runs once per :data:`SETUPS` entry (a server and a database), in one server
process for all of that entry's tests; the tests share the database, so each writes
keys of its own, and the last test stops the server.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit

import httpx
import pytest

from _framework import (
    COMMIT_FAILED,
    POOL_DISPOSED,
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
from _servers import ROOT, Server, serve


@dataclass(frozen=True)
class Setup:
    """One server process: which server, and which database (``sqlite`` or PostgreSQL)."""

    server: str
    database: str

    @property
    def id(self) -> str:
        return f"{self.server}-{self.database}"


#: Two servers, both databases, in two processes per class.
SETUPS = (Setup("uvicorn", "sqlite"), Setup("hypercorn", "postgresql"))

_PARAMS = [
    pytest.param(
        setup,
        id=setup.id,
        marks=[pytest.mark.postgresql] if setup.database == "postgresql" else [],
    )
    for setup in SETUPS
]


class Served:
    """A server process per :data:`SETUPS` entry, serving ``target`` on a new database."""

    #: The app, as ``module:attribute``.
    target: ClassVar[str]
    #: Whether the app serves a ``SyncDatabase`` (a synchronous driver in its URL).
    sync: ClassVar[bool] = False
    #: Whether the test makes the probe's tables before the server starts.
    makes_tables: ClassVar[bool] = False
    #: The path polled until the server answers.
    ready_path: ClassVar[str] = "/health"

    @pytest.fixture(scope="class", params=_PARAMS)
    @classmethod
    def setup(cls, request: pytest.FixtureRequest) -> Setup:
        value: Setup = request.param
        return value

    @pytest.fixture(scope="class")
    @classmethod
    def database_url(
        cls,
        setup: Setup,
        request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[str]:
        """A new database for this class and setup: a SQLite file, or a PostgreSQL database."""
        sync_driver = "sqlite" if setup.database == "sqlite" else "postgresql+psycopg"
        driver = (
            sync_driver
            if cls.sync
            else ("sqlite+aiosqlite" if setup.database == "sqlite" else "postgresql+asyncpg")
        )
        if setup.database == "sqlite":
            directory = tmp_path_factory.mktemp("any-asgi-db")
            if cls.makes_tables:
                open_sync_database(f"sqlite:///{directory / 'test.db'}").dispose()
            yield f"{driver}:///{directory / 'test.db'}"
            return
        factory = request.getfixturevalue("_postgres_databases")
        database = factory.create()
        try:
            if cls.makes_tables:
                sync_url = database.set(drivername=sync_driver)
                open_sync_database(sync_url.render_as_string(hide_password=False)).dispose()
            yield database.set(drivername=driver).render_as_string(hide_password=False)
        finally:
            factory.drop(database)

    @pytest.fixture(scope="class")
    @classmethod
    def server(
        cls, setup: Setup, database_url: str, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Server]:
        """The app under ``setup.server``, logging ``asgi_sqla`` and the pool to its log."""
        env = {
            "DATABASE_URL": database_url,
            **server_logging_env(tmp_path_factory.mktemp(setup.id)),
        }
        with serve(cls.target, setup.server, env=env, ready_path=cls.ready_path) as running:
            yield running

    @pytest.fixture
    def client(self, server: Server) -> Iterator[httpx.Client]:
        """A client of ``server``; the timeout bounds a test whose server stopped answering."""
        with httpx.Client(base_url=server.url, timeout=10) as client:
            yield client


class StopsLast:
    """The test that stops the server: a base listed before the tests' own class.

    pytest collects a class's tests from its bases in reverse MRO order, so the tests
    of a class ``C(StopsLast, Tests)`` run first and this one after them.
    """

    sync: ClassVar[bool]

    def test_sigint_stops_the_server_cleanly_after_disposing_the_engine(
        self, server: Server, database_url: str
    ) -> None:
        disposed = SYNC_POOL_DISPOSED if self.sync else POOL_DISPOSED
        assert_sigint_stops_the_server_cleanly(server, database_url, disposed)


def committed(url: str, table: str, column: str, value: str) -> int:
    """How many committed rows of ``table`` hold ``value`` (read on a connection of its own)."""
    return int(query(url, f"SELECT count(*) FROM {table} WHERE {column} = '{value}'")[0][0])


class NotesTests(Served):
    """The common example contract, against ``examples/<name>_app.py``."""

    ready_path = "/notes"

    def test_a_created_note_is_answered_201_and_committed_before_the_status_arrives(
        self, client: httpx.Client, database_url: str
    ) -> None:
        text = unique("created")

        response = client.post("/notes", json={"text": text})

        assert response.status_code == 201, response.text
        assert response.json() == {"id": response.json()["id"], "text": text}
        assert isinstance(response.json()["id"], int)
        assert committed(database_url, "notes", "text", text) == 1
        assert no_transaction_left_open(database_url)

    @pytest.mark.parametrize("body", [{"text": ""}, {"text": "   "}, {}], ids=str)
    def test_an_empty_or_missing_text_is_answered_422_and_rolled_back(
        self, client: httpx.Client, database_url: str, body: dict[str, str]
    ) -> None:
        before = client.get("/notes/count").json()["count"]

        response = client.post("/notes", json=body)

        assert response.status_code == 422, response.text
        assert response.json() == {"error": "text must not be empty"}
        # The handler inserted the row before it refused it: the 422 rolled it back.
        assert client.get("/notes/count").json() == {"count": before}
        assert no_transaction_left_open(database_url)

    @pytest.mark.parametrize("content", [b"not json", b"", b"[1, 2]"], ids=repr)
    def test_a_body_that_is_not_a_json_object_is_answered_400_with_an_error(
        self, client: httpx.Client, content: bytes
    ) -> None:
        response = client.post(
            "/notes", content=content, headers={"content-type": "application/json"}
        )

        assert response.status_code == 400, response.text
        assert set(response.json()) == {"error"}

    def test_the_notes_are_listed_in_id_order_and_counted(self, client: httpx.Client) -> None:
        created = [client.post("/notes", json={"text": unique("listed")}).json() for _ in "ab"]

        listed = client.get("/notes")
        count = client.get("/notes/count")

        assert listed.status_code == 200
        notes = listed.json()
        assert [note["id"] for note in notes] == sorted(note["id"] for note in notes)
        assert all(set(note) == {"id", "text"} for note in notes)
        assert notes[-2:] == created
        assert count.status_code == 200
        assert count.json() == {"count": len(notes)}

    def test_one_note_is_found_by_id_and_a_missing_one_is_answered_404(
        self, client: httpx.Client
    ) -> None:
        note = client.post("/notes", json={"text": unique("found")}).json()

        found = client.get(f"/notes/{note['id']}")
        missing = client.get("/notes/999999999")

        assert (found.status_code, found.json()) == (200, note)
        assert (missing.status_code, missing.json()) == (404, {"error": "no such note"})


class PromisesTests(Served):
    """The package's promises, against ``tests/apps/probe_<name>.py``."""

    makes_tables = True
    #: Whether the framework cancels a handler whose client disconnected, so that its
    #: connection is back at once (Django's ``async def`` views).
    stops_on_disconnect: ClassVar[bool] = False
    #: Whether the work of a request whose client disconnected is rolled back (Django
    #: cancels the view; a ``def`` view's thread runs on, and is rolled back at its end).
    rolls_back_on_disconnect: ClassVar[bool] = False
    #: What the server log shows of ``/raises``'s exception (the framework logs it).
    exception_logged: ClassVar[str] = "RaisedOnPurpose"

    @staticmethod
    def pool(client: httpx.Client) -> dict[str, int]:
        """The server's pool: connections checked out now, and checkouts so far."""
        response = client.get("/pool")
        assert response.status_code == 200, response.text
        report: dict[str, int] = response.json()
        return report

    def test_a_2xx_write_is_committed_before_its_status_arrives(
        self, client: httpx.Client, database_url: str
    ) -> None:
        key = unique("created")

        response = client.post(f"/items/{key}/201")

        assert response.status_code == 201, response.text
        assert committed(database_url, "items", "key", key) == 1
        assert self.pool(client)["checked_out"] == 0
        assert no_transaction_left_open(database_url)

    def test_a_4xx_rolls_the_write_back(self, client: httpx.Client, database_url: str) -> None:
        key = unique("refused")

        response = client.post(f"/items/{key}/409")

        assert response.status_code == 409
        assert committed(database_url, "items", "key", key) == 0
        assert self.pool(client)["checked_out"] == 0
        assert no_transaction_left_open(database_url)

    def test_a_commit_that_fails_answers_500_and_commits_nothing(
        self, client: httpx.Client, server: Server, database_url: str
    ) -> None:
        key, after = unique("orphan"), unique("after-orphan")
        log_start = len(server.log)

        # The item and the orphan child are inserted; the deferred foreign key fails the COMMIT.
        response = client.post(f"/orphans/{key}")

        assert response.status_code == 500
        assert response.text == "Internal Server Error"  # the middleware's, not the app's 201
        assert committed(database_url, "items", "key", key) == 0
        log = server.log[log_start:]
        assert COMMIT_FAILED in log
        assert "instead of the app's 201 response" in log
        assert not server_reported_an_app_error(log), log
        assert self.pool(client)["checked_out"] == 0
        assert no_transaction_left_open(database_url)
        assert client.post(f"/items/{after}/201").status_code == 201

    def test_a_request_that_never_touches_the_database_checks_out_no_connection(
        self, client: httpx.Client
    ) -> None:
        before = self.pool(client)

        for _ in range(3):
            response = client.get("/health")
            assert response.status_code == 200
            assert response.json() == {"connections_in_use": 0}

        assert self.pool(client) == before
        # The counter does see a request that uses the database: one checkout, given back.
        assert client.post(f"/items/{unique('counted')}/201").status_code == 201
        assert self.pool(client) == {"checked_out": 0, "checkouts": before["checkouts"] + 1}

    def test_the_connection_is_back_in_the_pool_while_the_client_still_reads_the_body(
        self, client: httpx.Client, database_url: str
    ) -> None:
        key = unique("streamed")

        with client.stream("POST", f"/streams/{key}") as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines) == "written"
            # The body waits for the release below: the response is still going out.
            assert committed(database_url, "items", "key", key) == 1
            assert self.pool(client)["checked_out"] == 0
            if database_url.startswith("postgresql"):
                assert all(state == "idle" for _, state, _ in server_backends(database_url))
            assert client.post(f"/releases/{key}").status_code == 200
            assert list(lines) == ["released"]

    def test_an_exception_in_a_handler_is_a_500_with_the_write_rolled_back(
        self, client: httpx.Client, server: Server, database_url: str
    ) -> None:
        key = unique("raised")
        log_start = len(server.log)

        response = client.post(f"/raises/{key}")

        assert response.status_code == 500
        assert committed(database_url, "items", "key", key) == 0
        assert self.pool(client)["checked_out"] == 0
        assert no_transaction_left_open(database_url)
        # The framework answered the 500 itself and logged the exception; the exception
        # never reached the server (which would log it as an app error).
        log = server.log[log_start:]
        assert eventually(lambda: self.exception_logged in server.log[log_start:]), log
        assert not server_reported_an_app_error(server.log[log_start:]), server.log[log_start:]

    def test_a_client_that_disconnects_mid_request_leaves_nothing_checked_out(
        self, client: httpx.Client, server: Server, database_url: str
    ) -> None:
        key = unique("disconnected")
        address = urlsplit(server.url)
        assert address.hostname is not None
        assert address.port is not None
        request = f"POST /waits/{key} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"

        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            sock.sendall(request.encode())
            # The handler has written and now waits, holding the request's connection.
            assert eventually(lambda: self.pool(client)["checked_out"] == 1)
        # The client is gone.
        if self.stops_on_disconnect:
            # The framework cancelled the handler: rolled back, nothing held, no release.
            assert eventually(lambda: self.pool(client)["checked_out"] == 0)
            assert committed(database_url, "items", "key", key) == 0
        assert client.post(f"/releases/{key}").status_code == 200
        assert eventually(lambda: self.pool(client)["checked_out"] == 0)
        assert no_transaction_left_open(database_url)
        if self.rolls_back_on_disconnect:
            assert committed(database_url, "items", "key", key) == 0
            # A `def` view's thread wrote again after the wait: not committed either.
            assert committed(database_url, "items", "key", f"{key}-late") == 0

    def test_two_requests_at_once_use_two_sessions(
        self, client: httpx.Client, server: Server
    ) -> None:
        pair = unique("pair")
        answers: list[httpx.Response] = []

        def meet() -> None:
            with httpx.Client(base_url=server.url, timeout=15) as own:
                answers.append(own.post(f"/meets/{pair}"))

        threads = [threading.Thread(target=meet) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)

        assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
        first, second = (a.json() for a in answers)
        # Both were in their handlers at once.
        assert first["met"]
        assert second["met"]
        assert first["session"] != second["session"]
        if self.sync:
            assert first["thread"] != second["thread"]  # a thread per request
        assert self.pool(client)["checked_out"] == 0


class NotesContract(StopsLast, NotesTests):
    """The example contract; a subclass sets ``target`` (and ``sync``)."""


class Promises(StopsLast, PromisesTests):
    """The promises; a subclass sets ``target`` (and ``sync``, ``cancels_on_disconnect``)."""


# -- the pages of docs/frameworks/: their Python blocks are the example apps ---------------

DOCS = ROOT / "docs"


def page_blocks(page: str) -> dict[str, str]:
    """The ``python`` blocks of ``docs/<page>``, by the file their first line names."""
    blocks: dict[str, str] = {}
    text = (DOCS / page).read_text()
    for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL):
        first_line, _, code = block.partition("\n")
        assert re.fullmatch(r"# \w+\.py", first_line), f"{page}: {first_line!r}"
        blocks[first_line[2:-3]] = code
    return blocks


def example_code(name: str) -> str:
    """``examples/<name>.py`` after its module docstring: what the page shows of it.

    The page is run by the tests of this package through the example itself: a block
    that differs from the file in one character fails this comparison.
    """
    source = (ROOT / "examples" / f"{name}.py").read_text()
    docstring_end = source.index('"""\n', source.index('"""') + 3) + len('"""\n')
    return source[docstring_end:].lstrip("\n")
