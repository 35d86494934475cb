"""Tests of ``examples/litestar_app.py``, each in a transaction rolled back at its end.

Run them with ``pytest examples/test_litestar_app.py``: each test gets a new SQLite file
(``examples/conftest.py``), never the database ``make run`` serves, or the database
``EXAMPLES_DATABASE_URL`` names.  The asgi_sqla pytest plugin, installed with
``pip install 'asgi-sqla[pytest]'``, gives each test an outer transaction on one
connection, and every session the app opens during the test joins it through a
savepoint: the app's commits and rollbacks behave as in production (a 422 really
rolls back, the next request sees what the previous one committed), and when the test
ends everything is rolled back, so each test starts from the same data.

Two fixtures set it up: ``asgi_sqla_databases`` names the app's databases, and
``asgi_sqla_transaction`` (requested here through ``client``) runs the test in the
transaction.  The app is called in the test's event loop, through httpx's ASGI
transport, with its lifespan driven by ``asgi_lifespan.LifespanManager`` so that its
startup (creating the tables) runs as under a server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from httpx_ws import AsyncWebSocketSession, aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport
from sqlalchemy import select

from asgi_sqla import Database
from asgi_sqla.pytest_plugin import OuterTransaction
from examples.litestar_app import Event, NoteIn, add_note, app, db

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's async drivers run on asyncio


@pytest.fixture
def asgi_sqla_databases() -> list[Database]:
    """The databases whose sessions join each test's transaction."""
    return [db]


@pytest.fixture
async def client(asgi_sqla_transaction: OuterTransaction) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP and websocket client of the app, started and stopped inside the transaction.

    The transport is given ``app`` itself, not ``LifespanManager.app``: that one hands
    every request the same lifespan ``state`` dict, where a server gives each a copy
    (and Litestar caches each request's parsed body there).  ``raise_app_exceptions=False``
    lets the client see the 500 a server would send, instead of the app's exception.
    """
    async with (
        LifespanManager(app),
        httpx.AsyncClient(
            transport=ASGIWebSocketTransport(app, raise_app_exceptions=False),
            base_url="http://testserver",
        ) as client,
    ):
        yield client


async def texts(client: httpx.AsyncClient) -> list[str]:
    response = await client.get("/notes")
    assert response.status_code == 200
    return [note["text"] for note in response.json()]


async def test_a_created_note_is_listed(client: httpx.AsyncClient) -> None:
    response = await client.post("/notes", json={"text": "hello"})

    assert response.status_code == 201
    assert await texts(client) == ["hello"]


async def test_each_test_starts_without_the_notes_of_the_others(client: httpx.AsyncClient) -> None:
    assert await texts(client) == []


async def test_an_empty_note_answers_422_and_is_rolled_back(client: httpx.AsyncClient) -> None:
    response = await client.post("/notes", json={"text": " "})

    assert response.status_code == 422
    assert await texts(client) == []  # the row was inserted, then rolled back


async def test_a_reply_to_a_missing_note_fails_its_commit_with_500(
    client: httpx.AsyncClient,
) -> None:
    if db.engine.dialect.name != "postgresql":
        pytest.skip("SQLite checks deferred foreign keys only when the test's transaction ends")

    response = await client.post("/notes", json={"text": "re", "parent_id": 999})

    # The INSERT passed; the deferred foreign key failed at the app's commit.
    assert response.status_code == 500
    assert await texts(client) == []


async def test_a_missing_note_answers_404(client: httpx.AsyncClient) -> None:
    created = (await client.post("/notes", json={"text": "hello"})).json()

    assert (await client.get(f"/notes/{created['id']}")).json()["text"] == "hello"
    assert (await client.get(f"/notes/{created['id'] + 1}")).status_code == 404


async def test_a_batch_is_saved_all_or_nothing(client: httpx.AsyncClient) -> None:
    saved = await client.post("/notes/batch", json=[{"text": "a"}, {"text": "b"}])
    failed = await client.post("/notes/batch", json=[{"text": "c"}, {"text": "x" * 501}])

    assert (saved.status_code, failed.status_code) == (201, 500)
    assert await texts(client) == ["a", "b"]


async def test_a_background_task_records_the_created_note(client: httpx.AsyncClient) -> None:
    note = (await client.post("/notes", json={"text": "hello"})).json()

    async with db.scope() as session:
        events = await session.scalars(select(Event.message))
        assert list(events) == [f"created note {note['id']}: hello"]


async def test_the_export_streams_every_note(client: httpx.AsyncClient) -> None:
    await client.post("/notes/batch", json=[{"text": "a"}, {"text": "b"}])

    response = await client.get("/notes/export")

    assert response.status_code == 200
    assert [json.loads(line)["text"] for line in response.text.splitlines()] == ["a", "b"]


async def test_the_websocket_saves_each_message_as_a_note(client: httpx.AsyncClient) -> None:
    websocket: AsyncWebSocketSession
    async with aconnect_ws("/ws", client) as websocket:
        await websocket.send_json({"text": "first"})
        assert (await websocket.receive_json())["text"] == "first"
        await websocket.send_json({"text": "second"})
        assert (await websocket.receive_json())["text"] == "second"

    assert await texts(client) == ["first", "second"]


async def test_concurrent_requests_each_commit_their_own_note(client: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(
        *(client.post("/notes", json={"text": f"note {i}"}) for i in range(8)),
        client.post("/notes", json={"text": ""}),
    )

    assert sorted(response.status_code for response in responses) == [201] * 8 + [422]
    assert sorted(await texts(client)) == [f"note {i}" for i in range(8)]


async def test_a_service_function_runs_inside_db_scope(client: httpx.AsyncClient) -> None:
    async with db.scope() as session:
        await add_note(session, NoteIn(text="from a script"))
    # The scope committed: its savepoint was released into the test's transaction.

    assert await texts(client) == ["from a script"]
