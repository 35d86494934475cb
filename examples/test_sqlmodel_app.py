"""Tests of ``examples/sqlmodel_app.py``, each in a transaction rolled back at its end.

Run them with ``pytest examples/test_sqlmodel_app.py``: each test gets a new SQLite file
(``examples/conftest.py``), never the database ``make run`` serves, or the database
``EXAMPLES_DATABASE_URL`` names (with a synchronous driver).  Plain ``def`` tests, FastAPI's
``TestClient``, and the asgi_sqla pytest plugin's ``asgi_sqla_sync_transaction``: each
test gets an outer transaction on one connection, every session the app opens joins it
through a savepoint (so a 404 really rolls back, and the next request sees what the
previous one committed), and everything is rolled back when the test ends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from asgi_sqla import SyncDatabase
from asgi_sqla.pytest_plugin import SyncOuterTransaction
from examples.sqlmodel_app import Hero, app, db


@pytest.fixture
def sqlite_driver() -> str:
    """The test database's driver: a ``SyncDatabase`` needs a synchronous one."""
    return "sqlite"


@pytest.fixture
def asgi_sqla_databases() -> list[SyncDatabase]:
    """The databases whose sessions join each test's transaction."""
    return [db]


@pytest.fixture
def client(asgi_sqla_sync_transaction: SyncOuterTransaction) -> Iterator[TestClient]:
    """A client of the app, its lifespan (creating the tables) run inside the transaction."""
    with TestClient(app) as client:
        yield client


@pytest.fixture
def deadpond(client: TestClient) -> int:
    """A hero seeded through ``db.scope()``, inside the test's transaction."""
    with db.scope() as session:
        hero = Hero(name="Deadpond", secret_name="Dive Wilson", age=30)
        session.add(hero)
        session.flush()
        assert hero.id is not None
        return hero.id


def test_a_created_hero_is_listed(client: TestClient) -> None:
    created = client.post("/heroes/", json={"name": "Rusty-Man", "secret_name": "Tommy"})

    assert created.status_code == 200
    assert created.json()["id"] is not None
    assert [hero["name"] for hero in client.get("/heroes/").json()] == ["Rusty-Man"]


def test_each_test_starts_from_the_same_data(client: TestClient) -> None:
    assert client.get("/heroes/").json() == []


def test_a_seeded_hero_is_updated_and_its_birthday_committed(
    client: TestClient, deadpond: int
) -> None:
    assert client.patch(f"/heroes/{deadpond}", json={"age": 31}).json()["age"] == 31
    assert client.post(f"/heroes/{deadpond}/birthday").json()["age"] == 32
    with db.scope() as session:
        assert session.exec(select(Hero.age).where(Hero.id == deadpond)).one() == 32


def test_a_missing_hero_is_a_404_that_changes_nothing(client: TestClient, deadpond: int) -> None:
    assert client.patch("/heroes/999", json={"age": 1}).status_code == 404
    assert client.delete(f"/heroes/{deadpond}").json() == {"ok": True}
    assert client.get(f"/heroes/{deadpond}").status_code == 404


def test_the_health_check_holds_no_connection(client: TestClient) -> None:
    # The one connection checked out is the test's own, which the app's sessions share.
    assert client.get("/health").json() == {"status": "ok", "connections_in_use": 1}
