"""pytest plugin: test your app behind ``SQLAlchemyMiddleware`` against a real database,
and leave nothing behind.

Installed with ``pip install 'asgi-sqla[pytest]'`` and registered through the
``pytest11`` entry point, it does nothing until a test asks for it: name your app's
databases in a fixture, and request ``asgi_sqla_transaction``::

    # conftest.py
    import pytest

    from myapp import db


    @pytest.fixture
    def anyio_backend() -> str:
        return "asyncio"  # SQLAlchemy's async drivers need asyncio


    @pytest.fixture
    def asgi_sqla_databases():
        return [db]


    # test_notes.py
    import httpx
    import pytest

    from myapp import app

    pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("asgi_sqla_transaction")]


    async def test_a_note_is_listed_after_it_is_created() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.post("/notes", json={"text": "hi"})).status_code == 201
            assert [n["text"] for n in (await client.get("/notes")).json()] == ["hi"]

An app whose database is a ``SyncDatabase`` (``def`` endpoints) is tested the way such
apps usually are, with plain ``def`` tests and Starlette's or FastAPI's ``TestClient``;
they request ``asgi_sqla_sync_transaction``, and need neither anyio nor
``anyio_backend``::

    # conftest.py
    import pytest

    from myapp import Note, db  # db = SyncDatabase("postgresql+psycopg://...")


    @pytest.fixture
    def asgi_sqla_databases():
        return [db]


    @pytest.fixture
    def a_note(asgi_sqla_sync_transaction):  # rows seeded inside the test's transaction
        with db.scope() as session:
            session.add(Note(text="seeded"))


    # test_notes.py
    import pytest
    from fastapi.testclient import TestClient
    from sqlalchemy import func, select

    from myapp import Note, app, db

    pytestmark = pytest.mark.usefixtures("asgi_sqla_sync_transaction")


    def test_a_note_is_listed_after_it_is_created(a_note) -> None:
        client = TestClient(app)
        assert client.post("/notes", json={"text": "hi"}).status_code == 201
        assert [n["text"] for n in client.get("/notes").json()] == ["seeded", "hi"]
        with db.scope() as session:
            assert session.scalar(select(func.count()).select_from(Note)) == 2

Which fixture.  ``asgi_sqla_transaction`` is an async fixture, for async tests run by
anyio's pytest plugin; it binds ``Database`` and ``SyncDatabase`` objects alike (an app
with both is tested in async tests).  ``asgi_sqla_sync_transaction`` is a plain fixture
for synchronous tests, and binds ``SyncDatabase`` objects only: an async ``Database``'s
sessions must run on the event loop of the test that bound it, and a synchronous test
has none (``TestClient`` runs the app on a loop of its own, in a thread).  Given one,
it fails the test and says so.

How it works.  For each database the test gets one connection and begins an outer
transaction on it, which is rolled back when the test ends.  While the test runs, the
database is bound to that connection (``BaseDatabase._sessions_from``): every session
it makes, for a request, a websocket, ``db.scope()`` or ``db.new_session()``, joins
the outer transaction through a SAVEPOINT (SQLAlchemy's recipe "Joining a Session into
an External Transaction", ``join_transaction_mode="create_savepoint"``).  So the app's
commit releases its savepoint and its rollback rolls back to it, exactly where they
would happen in production: a 4xx really undoes the request's writes, a later request
sees what an earlier one committed, and at the end of the test all of it is gone.  How
the test calls the app does not matter (``httpx.ASGITransport``, the app's lifespan
driven with ``asgi_lifespan.LifespanManager``, a service function inside
``db.scope()``, a websocket through ``httpx_ws``, ``TestClient`` for a
``SyncDatabase``), as long as a ``Database``'s sessions run on the test's event loop:
an async test run by anyio's pytest plugin (Starlette's synchronous ``TestClient`` runs
the app on an event loop of its own, where the test's async connection cannot be used;
that is reported with an error saying so).  A ``SyncDatabase``'s connection belongs to
no loop: its sessions use it from whichever thread they run in, the test's own, the
framework's worker threads running ``def`` endpoints, and the threads in which the
package ends sessions; one at a time, as the next paragraph says.

Sessions take turns.  A driver connection runs one statement at a time and savepoints
form a stack, so sessions from concurrent requests (``asyncio.gather`` of several
requests in one test, or requests sent from several threads) must not interleave on
the test's connection.  A session takes the turn at its first statement and gives it
back when it is closed (at response start, when a websocket waits for its next
message, at the end of ``db.scope()``), in whatever task or thread that happens;
meanwhile other sessions wait for theirs (an async session in its task, a synchronous
one blocking its thread).  Sessions opened *inside* the one that holds the turn do not
wait: those opened later in the same task or in tasks it starts (a ``db.new_session()``
or ``db.scope()`` block in a handler, the request's own sessions of other databases, a
request the test sends from inside its ``db.scope()`` block).  For a ``SyncDatabase``
the same holds with threads: sessions opened later in the same thread call, or in the
requests a test thread sends through ``TestClient`` from inside its ``with
db.scope()`` block (``TestClient`` runs the app in a copy of the test thread's context:
"inside" is told by a context variable), do not wait; nor do those opened later in the
code of the same request (a ``db.new_session()`` block in a ``def`` endpoint, after a
``def`` dependency used ``db.session``: frameworks run them one after another, each in
a thread call of its own).  Their savepoints sit on top of the holder's, so they must
end before it, as ``with`` blocks do.  A session that waits longer than
``asgi_sqla_wait_timeout`` seconds (an ini option, 10 by default) raises
``ConnectionTurnTimeout`` naming the holder: a test that keeps a session open while it
waits for another request that needs the database would otherwise hang, where in
production both would have had a connection.  One turn covers all the test's
databases, async and synchronous, so two requests that use them in opposite orders
cannot deadlock.

Lifespan.  A test (or fixture) may drive the app's lifespan inside the test's
transaction (``LifespanManager``, or ``with TestClient(app) as client:``): startup
finds the engine the test already uses and checks it as usual, and the shutdown's
``dispose()`` does nothing while the database is bound.  The plugin disposes the engine
when the test ends, after rolling back: an async engine's connections belong to the
test's event loop, and the next test gets a new engine either way.

What behaves differently from production, and why:

* The sessions of a test share one transaction, so a session sees what another wrote
  before that one committed (in production, isolation would hide it until then).
* A request's ``db.session`` read for the first time inside a ``db.new_session()`` or
  ``db.scope()`` block of the same request is refused when the block ends: the
  request's savepoint, opened after the block's, sits on top of it, and releasing the
  block's would end both.  Read ``db.session`` before the block.
* Code that uses ``db.engine`` directly (``engine.begin()`` in a startup hook,
  migrations) gets a connection of its own, outside the test's transaction, and what
  it commits stays.  Create the schema that way (once, or at startup), and write rows
  through sessions.
* On PostgreSQL, constraints declared ``DEFERRABLE INITIALLY DEFERRED`` are checked
  when the app commits, as the real ``COMMIT`` would (releasing a savepoint checks
  nothing): before a session's commit the plugin runs ``SET CONSTRAINTS ALL
  IMMEDIATE`` inside a savepoint of its own, and rolls that back, so the constraints'
  modes are left as they were.  A violation fails the app's commit, and the client
  gets its 500.  SQLite checks deferred foreign keys only at the end of the outermost
  transaction, which in a test never comes: there such a commit succeeds.
* A two-phase commit (``SQLAlchemyMiddleware(..., two_phase=True)``) becomes a plain
  one: ``PREPARE TRANSACTION`` would prepare the test's own transaction.
* ``db.read_session`` reads through ``db.session``: a replica cannot see the test's
  uncommitted rows.
* When the package would invalidate a session's connection (after a failed commit), the
  session rolls back to its savepoint instead: the connection is the test's, and its
  state is known.
* SQLite: its Python driver (``sqlite3``, and ``aiosqlite`` over it) does not emit
  ``BEGIN`` before a ``SAVEPOINT``, so the first savepoint would open the transaction
  and releasing it would commit.  The plugin emits ``BEGIN`` itself on the test's
  connection (the cause of SQLAlchemy's pysqlite recipe "Serializable isolation /
  Savepoints / Transactional DDL").  Use a database file: with ``:memory:`` every
  connection is a separate database.

Without pytest-anyio (with pytest-asyncio, say), use :func:`rolled_back` in a fixture
of your own: it is what ``asgi_sqla_transaction`` runs; :func:`rolled_back_sync` is
what ``asgi_sqla_sync_transaction`` runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import cast

import pytest

from .._database import BaseDatabase, Database
from .._errors import ConfigurationError
from .._syncdb import SyncDatabase
from ._outer import (
    OuterTransaction,
    SyncOuterTransaction,
    _check_databases,
    rolled_back,
    rolled_back_sync,
)
from ._turns import DEFAULT_WAIT_TIMEOUT, ConnectionTurnTimeout

__all__ = [
    "ConnectionTurnTimeout",
    "OuterTransaction",
    "SyncOuterTransaction",
    "rolled_back",
    "rolled_back_sync",
]

# As in asgi_sqla's own __init__: public classes show (in tracebacks, reprs and docs)
# under the name users import them by, asgi_sqla.pytest_plugin.ConnectionTurnTimeout
# rather than asgi_sqla.pytest_plugin._turns.ConnectionTurnTimeout.
for _name in __all__:
    _public = globals()[_name]
    if isinstance(_public, type) and _public.__module__.startswith(f"{__name__}._"):
        _public.__module__ = __name__
del _name, _public

_NO_DATABASES = (
    "asgi_sqla_transaction and asgi_sqla_sync_transaction need to know your app's "
    "databases: define a fixture named asgi_sqla_databases (in conftest.py, say) that "
    "returns them, e.g.\n\n"
    "    @pytest.fixture\n"
    "    def asgi_sqla_databases():\n"
    "        return [db]\n"
)
_NOT_ASYNCIO = (
    "asgi_sqla_transaction runs on asyncio (SQLAlchemy's async drivers need it), and this "
    "test runs on {backend!r}. Define a fixture `anyio_backend` returning 'asyncio'."
)
_ASYNC_IN_SYNC_TEST = (
    "asgi_sqla_sync_transaction binds SyncDatabase objects, for synchronous tests, and "
    "asgi_sqla_databases returned {db!r}, an async Database: its sessions must run on the "
    "event loop of the test that binds it, and a synchronous test has none (TestClient "
    "runs the app on a loop of its own). Test this app in async tests "
    "(@pytest.mark.anyio) with asgi_sqla_transaction, which binds Database and "
    "SyncDatabase objects alike."
)


def _as_databases(value: object) -> tuple[Database | SyncDatabase, ...]:
    if isinstance(value, BaseDatabase):
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError(
            f"asgi_sqla_databases returned {type(value).__name__}; return a Database or "
            "SyncDatabase, or a list of them."
        )
    databases = tuple(value)
    _check_databases(databases)
    return databases


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "asgi_sqla_wait_timeout",
        "Seconds a session may wait for its turn on the test's connection "
        f"(asgi_sqla_transaction, asgi_sqla_sync_transaction; default "
        f"{DEFAULT_WAIT_TIMEOUT:g}).",
        default=str(DEFAULT_WAIT_TIMEOUT),
    )


@pytest.fixture
def asgi_sqla_databases() -> object:
    """The app's databases, for ``asgi_sqla_transaction``: define this fixture yourself.

    Return a ``Database`` or ``SyncDatabase``, or a list of them, e.g. in
    ``conftest.py``::

        @pytest.fixture
        def asgi_sqla_databases():
            return [db]

    This default fails the test with that advice.
    """
    pytest.fail(_NO_DATABASES, pytrace=False)


@pytest.fixture
async def asgi_sqla_transaction(
    asgi_sqla_databases: object, anyio_backend: object, request: pytest.FixtureRequest
) -> AsyncIterator[OuterTransaction]:
    """Run the test in an outer transaction per database, rolled back when it ends.

    Every session the app opens meanwhile joins it through a savepoint, so the app's
    commits and rollbacks behave as in production and nothing persists after the test.
    Request it by name, or for a whole module with
    ``pytestmark = pytest.mark.usefixtures("asgi_sqla_transaction")``; the test runs on
    asyncio through anyio's pytest plugin (``@pytest.mark.anyio``).  Yields an
    :class:`OuterTransaction`.  The databases come from ``asgi_sqla_databases``
    (``Database`` and ``SyncDatabase`` objects); the ini option
    ``asgi_sqla_wait_timeout`` sets how long a session may wait for its turn on the
    shared connection.  For synchronous tests, see ``asgi_sqla_sync_transaction``.
    """
    backend = anyio_backend[0] if isinstance(anyio_backend, tuple) else anyio_backend
    if backend != "asyncio":
        pytest.fail(_NOT_ASYNCIO.format(backend=backend), pytrace=False)
    databases = _as_databases(asgi_sqla_databases)
    async with rolled_back(*databases, wait_timeout=_wait_timeout(request)) as outer:
        yield outer


@pytest.fixture
def asgi_sqla_sync_transaction(
    asgi_sqla_databases: object, request: pytest.FixtureRequest
) -> Iterator[SyncOuterTransaction]:
    """``asgi_sqla_transaction`` for synchronous tests of ``SyncDatabase`` objects.

    A plain fixture: the test is a ``def`` function, which calls the app through
    Starlette's or FastAPI's ``TestClient`` and may use ``with db.scope():`` itself, as
    may the synchronous fixtures that request this one (to seed rows, say).  Yields a
    :class:`SyncOuterTransaction`.  The databases come from ``asgi_sqla_databases``
    and must all be ``SyncDatabase`` objects: an app with an async ``Database`` is
    tested in async tests, with ``asgi_sqla_transaction``.
    """
    databases = _as_databases(asgi_sqla_databases)
    for db in databases:
        if not isinstance(db, SyncDatabase):
            pytest.fail(_ASYNC_IN_SYNC_TEST.format(db=db), pytrace=False)
    sync_databases = cast(tuple[SyncDatabase, ...], databases)
    with rolled_back_sync(*sync_databases, wait_timeout=_wait_timeout(request)) as outer:
        yield outer


def _wait_timeout(request: pytest.FixtureRequest) -> float:
    return float(request.config.getini("asgi_sqla_wait_timeout"))
