"""The notes API every example serves, checked on each one: the same routes, statuses, bodies.

``docs/guides/examples.md`` shows one set of curl lines that works against every
example; this file checks each rule of that API on every example app, called in the
test's event loop through httpx-ws's ASGI transport with its lifespan run by
``asgi_lifespan.LifespanManager`` (so its startup creates its tables, as under a
server), on a new SQLite file per test.  The rows are read back through a connection
of the test's own.  To check a new example, add its line to ``EXAMPLES``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy
from asgi_lifespan import LifespanManager
from httpx_ws import AsyncWebSocketSession, aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport
from sqlalchemy import event

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Example:
    """How one example app is started; ``examples/<name>_app.py`` serves it as ``app``."""

    #: Whether its ``db`` is a ``SyncDatabase`` (its SQLite URL uses sqlite3).
    sync: bool = False
    #: Whether ``POST /notes`` takes a ``parent_id`` (a foreign key checked at COMMIT).
    parent_id: bool = True
    #: Whether it serves ``POST /notes/batch`` (one transaction) and ``GET /notes/export``.
    batch_and_export: bool = True
    #: Whether ``/ws`` saves each ``{"text": ...}`` message as a note, replying with it
    #: (checked here in-process; ``tests/test_frameworks.py`` checks it in real servers).
    websocket: bool = True


#: Every example app, by the name ``make run FRAMEWORK=<name>`` knows it by.
EXAMPLES = {
    "asgi": Example(),
    "starlette": Example(),
    "fastapi": Example(),
    "litestar": Example(),
    # Quart closes a websocket opened through httpx-ws's ASGI transport at once (1000).
    "quart": Example(websocket=False),
    "sqlmodel": Example(sync=True, batch_and_export=False, websocket=False),
}

NOT_AN_OBJECT = {"error": "the body must be a JSON object with a text field"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's async drivers run on asyncio


@pytest.fixture(params=list(EXAMPLES))
def example_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def sqlite_driver(example_name: str) -> str:
    return "sqlite" if EXAMPLES[example_name].sync else "sqlite+aiosqlite"


@pytest.fixture
def database_url(sqlite_driver: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new SQLite file for each test, whatever ``EXAMPLES_DATABASE_URL`` says: the
    tests below count ids and rows from an empty database."""
    url = f"{sqlite_driver}:///{tmp_path / 'notes.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    return url


@pytest.fixture
def example(example_name: str) -> ModuleType:
    return importlib.import_module(f"examples.{example_name}_app")


@pytest.fixture
async def client(example: ModuleType, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the example, its lifespan run around the test.

    ``raise_app_exceptions=False`` lets the client see the 500 a server would send.
    """
    app = example.app
    transport = ASGIWebSocketTransport(app, raise_app_exceptions=False)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        yield client


@pytest.fixture
def inserts(example: ModuleType, client: httpx.AsyncClient) -> Iterator[list[str]]:
    """The INSERT statements the example sends to its database, from now on."""
    engine = example.db.engine
    sync_engine = getattr(engine, "sync_engine", engine)
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO NOTES"):
            sent.append(statement)

    event.listen(sync_engine, "before_cursor_execute", record)
    yield sent
    event.remove(sync_engine, "before_cursor_execute", record)


def committed_texts(database_url: str) -> list[str]:
    """The texts of the notes committed, read through a connection of the test's own."""
    engine = sqlalchemy.create_engine(database_url.replace("+aiosqlite", ""))
    try:
        with engine.connect() as connection:
            return list(connection.scalars(sqlalchemy.text("SELECT text FROM notes ORDER BY id")))
    finally:
        engine.dispose()


async def eventually_committed(database_url: str, texts: list[str]) -> bool:
    """Whether the committed texts become ``texts`` within 10 s (polled: no event to wait on)."""
    deadline = anyio.current_time() + 10
    committed = committed_texts(database_url)
    while committed != texts and anyio.current_time() < deadline:
        await anyio.sleep(0.01)
        committed = committed_texts(database_url)
    return committed == texts


def files_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def post(client: httpx.AsyncClient, body: Any) -> httpx.Response:
    return await client.post("/notes", json=body)


async def test_created_notes_answer_201_and_are_listed_in_id_order(
    client: httpx.AsyncClient, database_url: str
) -> None:
    first, second = await post(client, {"text": "hello"}), await post(client, {"text": "world"})

    assert (first.status_code, first.json()) == (201, {"id": 1, "text": "hello"})
    assert (second.status_code, second.json()) == (201, {"id": 2, "text": "world"})
    listed = await client.get("/notes")
    assert listed.status_code == 200
    assert listed.json() == [{"id": 1, "text": "hello"}, {"id": 2, "text": "world"}]
    assert committed_texts(database_url) == ["hello", "world"]


@pytest.mark.parametrize(
    "body", [{"text": ""}, {"text": "   "}, {}], ids=["empty", "blank", "none"]
)
async def test_a_note_without_text_is_written_then_rolled_back_by_its_422(
    client: httpx.AsyncClient, inserts: list[str], database_url: str, body: dict[str, str]
) -> None:
    response = await post(client, body)

    assert (response.status_code, response.json()) == (422, {"error": "text must not be empty"})
    assert len(inserts) == 1  # the row was written...
    assert committed_texts(database_url) == []  # ...and rolled back, as 422 >= 400
    assert (await client.get("/notes/count")).json() == {"count": 0}


@pytest.mark.parametrize(
    "content",
    [b"hello", b"[1, 2]", b'"text"', b'{"text": 5}', b'{"text": null}'],
    ids=["text", "list", "str", "int", "null"],
)
async def test_a_body_that_is_not_a_json_object_with_text_answers_400(
    client: httpx.AsyncClient, database_url: str, content: bytes
) -> None:
    response = await client.post(
        "/notes", content=content, headers={"content-type": "application/json"}
    )

    assert (response.status_code, response.json()) == (400, NOT_AN_OBJECT)
    assert committed_texts(database_url) == []


async def test_the_count_counts_the_committed_notes(client: httpx.AsyncClient) -> None:
    assert (await client.get("/notes/count")).json() == {"count": 0}
    await post(client, {"text": "one"})
    await post(client, {"text": ""})

    response = await client.get("/notes/count")

    assert (response.status_code, response.json()) == (200, {"count": 1})


async def test_a_note_is_read_by_id_and_a_missing_one_is_a_404(client: httpx.AsyncClient) -> None:
    await post(client, {"text": "hello"})

    found, missing = await client.get("/notes/1"), await client.get("/notes/2")

    assert (found.status_code, found.json()) == (200, {"id": 1, "text": "hello"})
    assert (missing.status_code, missing.json()) == (404, {"error": "no such note"})


@pytest.mark.parametrize("example_name", [name for name, e in EXAMPLES.items() if e.parent_id])
async def test_a_reply_to_a_missing_note_fails_its_commit_and_answers_500(
    client: httpx.AsyncClient, inserts: list[str], database_url: str
) -> None:
    response = await post(client, {"text": "re", "parent_id": 999})

    assert response.status_code == 500
    assert len(inserts) == 1  # the INSERT passed; the deferred foreign key failed the COMMIT
    assert committed_texts(database_url) == []


@pytest.mark.parametrize(
    "example_name", [name for name, e in EXAMPLES.items() if e.batch_and_export]
)
async def test_a_batch_is_one_transaction_all_or_nothing(
    client: httpx.AsyncClient, database_url: str
) -> None:
    saved = await client.post("/notes/batch", json=[{"text": "a"}, {"text": "b"}])
    # The second note breaks the CHECK constraint: IntegrityError halfway, a 500.
    failed = await client.post("/notes/batch", json=[{"text": "c"}, {"text": "x" * 501}])

    assert (saved.status_code, saved.json()) == (
        201,
        [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}],
    )
    assert failed.status_code == 500
    assert committed_texts(database_url) == ["a", "b"]


@pytest.mark.parametrize(
    "example_name", [name for name, e in EXAMPLES.items() if e.batch_and_export]
)
async def test_the_export_streams_every_note_as_a_json_line(client: httpx.AsyncClient) -> None:
    await post(client, {"text": "a"})
    await post(client, {"text": "b"})

    response = await client.get("/notes/export")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line) for line in response.text.splitlines()] == [
        {"id": 1, "text": "a"},
        {"id": 2, "text": "b"},
    ]


@pytest.mark.parametrize("example_name", [name for name, e in EXAMPLES.items() if e.websocket])
async def test_the_websocket_saves_each_message_as_a_note_committed_before_the_next(
    client: httpx.AsyncClient, database_url: str
) -> None:
    websocket: AsyncWebSocketSession
    async with aconnect_ws("/ws", client) as websocket:
        await websocket.send_json({"text": "first"})
        assert await websocket.receive_json() == {"id": 1, "text": "first"}
        await websocket.send_json({"text": "second"})
        assert await websocket.receive_json() == {"id": 2, "text": "second"}
        # The app read the second message: the first was committed before it could.
        assert committed_texts(database_url)[:1] == ["first"]
        # The second commits once the app waits for the next, the socket still open.
        assert await eventually_committed(database_url, ["first", "second"])


async def test_without_database_url_the_notes_go_to_a_file_of_the_examples_own(
    example_name: str, example: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `make run` serves when DATABASE_URL is unset: ./<framework>_example.db.
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.chdir(tmp_path)

    async with LifespanManager(example.app):
        pass

    assert files_in(tmp_path) == [f"{example_name}_example.db"]
