"""The outer transactions of a test: :func:`rolled_back` and :func:`rolled_back_sync`.

Each binds the databases it is given (``_binding``), one connection each, under one
set of turns (``_Turns``) for all of them, yields an :class:`OuterTransaction` (a
:class:`SyncOuterTransaction`) that hands out those connections, and rolls everything
back when the block ends.  The fixtures of ``asgi_sqla.pytest_plugin`` run them; a
fixture of the user's own may too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from typing import Any, TypeVar, overload

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from .._database import BaseDatabase, Database
from .._errors import ConfigurationError
from .._syncdb import SyncDatabase
from ._binding import _bound_async, _bound_sync
from ._turns import DEFAULT_WAIT_TIMEOUT, _Turns

__all__ = [
    "OuterTransaction",
    "SyncOuterTransaction",
    "_check_databases",
    "rolled_back",
    "rolled_back_sync",
]

_C = TypeVar("_C")

_ASYNC_IN_ROLLED_BACK_SYNC = (
    "rolled_back_sync() binds SyncDatabase objects, and {db!r} is an async Database: "
    "bind it with `async with rolled_back(...)` in an async test, which also takes "
    "SyncDatabase objects."
)


class OuterTransaction:
    """The transactions of one test: one connection per database, rolled back at the end.

    ``asgi_sqla_transaction`` yields it.  :meth:`connection` gives the test's connection
    to a database, to look at it with plain SQL between requests (it sees everything
    the app has committed in the test, and nothing is visible elsewhere): an
    ``AsyncConnection`` for a ``Database``, a ``Connection`` for a ``SyncDatabase``.
    """

    def __init__(
        self, connections: dict[Database | SyncDatabase, AsyncConnection | Connection]
    ) -> None:
        self._connections = connections

    @property
    def databases(self) -> tuple[Database | SyncDatabase, ...]:
        """The databases bound for this test, in the order given."""
        return tuple(self._connections)

    @overload
    def connection(self, db: SyncDatabase) -> Connection: ...
    @overload
    def connection(self, db: Database | None = None) -> AsyncConnection: ...
    def connection(self, db: BaseDatabase | None = None) -> AsyncConnection | Connection:
        """The test's connection to ``db`` (may be omitted when there is one ``Database``)."""
        connection = _connection_of(self._connections, db)
        if db is None and isinstance(connection, Connection):
            raise ConfigurationError(
                "connection() without a database gives the AsyncConnection of a Database, "
                "and this test's database is a SyncDatabase: pass it, connection(db)."
            )
        return connection


class SyncOuterTransaction:
    """:class:`OuterTransaction` for synchronous tests: ``rolled_back_sync()`` and
    ``asgi_sqla_sync_transaction`` yield it; its connections are ``Connection`` objects.
    """

    def __init__(self, connections: dict[SyncDatabase, Connection]) -> None:
        self._connections = connections

    @property
    def databases(self) -> tuple[SyncDatabase, ...]:
        """The databases bound for this test, in the order given."""
        return tuple(self._connections)

    def connection(self, db: SyncDatabase | None = None) -> Connection:
        """The test's connection to ``db`` (may be omitted when there is one database)."""
        return _connection_of(self._connections, db)


def _connection_of(connections: Mapping[Any, _C], db: BaseDatabase | None) -> _C:
    if db is None:
        if len(connections) != 1:
            raise ConfigurationError("This test has several databases: say which, connection(db).")
        return next(iter(connections.values()))
    try:
        return connections[db]
    except KeyError:
        raise ConfigurationError(f"{db!r} is not bound in this test.") from None


@asynccontextmanager
async def rolled_back(
    *databases: Database | SyncDatabase, wait_timeout: float = DEFAULT_WAIT_TIMEOUT
) -> AsyncIterator[OuterTransaction]:
    """Run the block in an outer transaction per database, rolled back at its end.

    What ``asgi_sqla_transaction`` does (see the module documentation), for use in a
    fixture of your own, e.g. under pytest-asyncio::

        @pytest_asyncio.fixture
        async def transaction():
            async with rolled_back(db) as outer:
                yield outer

    :param databases: The app's ``Database`` objects, and ``SyncDatabase`` objects if it
        has some (their sessions are used in threads; the test's event loop only sets
        their connections up, and rolls them back).
    :param wait_timeout: Seconds a session may wait for its turn on the connection
        before ``ConnectionTurnTimeout`` is raised.
    """
    _check_databases(databases)
    turns = _Turns(wait_timeout, asyncio.get_running_loop())
    connections: dict[Database | SyncDatabase, AsyncConnection | Connection] = {}
    async with AsyncExitStack() as stack:
        for db in databases:
            if isinstance(db, SyncDatabase):
                # A few blocking calls on the loop, before the test starts and after it
                # ends: nothing else runs then.
                connections[db] = stack.enter_context(_bound_sync(db, turns))
            else:
                connections[db] = await stack.enter_async_context(_bound_async(db, turns))
        yield OuterTransaction(connections)


@contextmanager
def rolled_back_sync(
    *databases: SyncDatabase, wait_timeout: float = DEFAULT_WAIT_TIMEOUT
) -> Iterator[SyncOuterTransaction]:
    """:func:`rolled_back` for ``SyncDatabase`` objects, in synchronous code.

    What ``asgi_sqla_sync_transaction`` does, for use in a fixture of your own::

        @pytest.fixture
        def transaction():
            with rolled_back_sync(db) as outer:
                yield outer

    :param databases: The app's ``SyncDatabase`` objects (an async ``Database`` needs
        :func:`rolled_back`, in an async test).
    :param wait_timeout: Seconds a session may wait for its turn on the connection
        before ``ConnectionTurnTimeout`` is raised.
    """
    _check_databases(databases)
    for db in databases:
        if not isinstance(db, SyncDatabase):
            raise ConfigurationError(_ASYNC_IN_ROLLED_BACK_SYNC.format(db=db))
    turns = _Turns(wait_timeout, None)
    with ExitStack() as stack:
        connections = {db: stack.enter_context(_bound_sync(db, turns)) for db in databases}
        yield SyncOuterTransaction(connections)


def _check_databases(databases: Iterable[object]) -> None:
    seen: list[BaseDatabase] = []
    for db in databases:
        if not isinstance(db, BaseDatabase):
            raise ConfigurationError(
                "Expected the app's asgi_sqla Database or SyncDatabase objects, got "
                f"{type(db).__name__}."
            )
        if any(db is other for other in seen):
            raise ConfigurationError(f"{db!r} was given twice; give each database once.")
        seen.append(db)
    if not seen:
        raise ConfigurationError("No database was given: there is nothing to roll back.")
