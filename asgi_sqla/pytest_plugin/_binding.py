"""One database bound to a connection of its own, in an outer transaction, for a block.

The connection and its outer transaction (with the ``BEGIN`` that SQLite's drivers do
not send), rolled back at the end, after which the engine is disposed; and, while the
block runs, the database's sessions made by a factory that joins them to that
transaction through a SAVEPOINT (``BaseDatabase._sessions_from``), of the turn-taking
classes of ``_async`` or ``_sync``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker
from sqlalchemy.orm import sessionmaker

from .._database import Database
from .._session import GuardedSession, guarded_class
from .._syncdb import SyncDatabase
from .._threaded import ThreadSession
from ._async import _session_classes
from ._sync import _thread_session_class
from ._turns import _Turns

__all__ = ["_bound_async", "_bound_sync"]


@asynccontextmanager
async def _bound_async(db: Database, turns: _Turns) -> AsyncIterator[AsyncConnection]:
    """``db`` bound to a connection of its own in an outer transaction, for the block."""
    async with _outer_transaction(db) as connection:
        async_class, sync_class = _session_classes(db, turns, connection.dialect.name)
        sessions = _ConnectionSessions(
            db, connection, class_=async_class, sync_session_class=sync_class
        )
        with db._sessions_from(sessions):
            yield connection


@contextmanager
def _bound_sync(db: SyncDatabase, turns: _Turns) -> Iterator[Connection]:
    """``db`` bound to a connection of its own in an outer transaction, for the block."""
    with _sync_outer_transaction(db) as connection:
        session_class = _thread_session_class(db, turns, connection.dialect.name)
        with db._sessions_from(_SyncConnectionSessions(db, connection, session_class)):
            yield connection


class _ConnectionSessions:
    """Sessions joined to a test's connection, for ``Database._sessions_from``.

    SQLAlchemy's recipe "Joining a Session into an External Transaction": with
    ``join_transaction_mode="create_savepoint"`` the app's commits release a SAVEPOINT
    and its rollbacks roll back to one, as in production, and nothing outlives the
    test.  Such a transaction cannot be prepared (two-phase commits run in one
    phase), reads stay on it (replicas cannot see the test's uncommitted rows), and
    the engine is the test's until the binding ends.
    """

    can_prepare = False
    pins_engine = True

    def __init__(self, db: Database, connection: AsyncConnection, **session_options: Any) -> None:
        options = {
            **db._session_options,
            **session_options,
            "join_transaction_mode": "create_savepoint",
        }
        options["class_"] = guarded_class(options["class_"])
        self._maker: async_sessionmaker[GuardedSession] = async_sessionmaker(connection, **options)

    def make(self, **options: Any) -> GuardedSession:
        return self._maker(**_joined(options))

    def make_read(self, engine: AsyncEngine) -> GuardedSession | None:
        return None  # read on the primary session: replicas cannot see the test's rows


class _SyncConnectionSessions:
    """:class:`_ConnectionSessions` for a ``SyncDatabase``: ``Session`` objects of
    ``session_class`` joined to the test's ``Connection`` through a SAVEPOINT.
    """

    can_prepare = False
    pins_engine = True

    def __init__(
        self, db: SyncDatabase, connection: Connection, session_class: type[ThreadSession]
    ) -> None:
        options = {
            **db._session_options,
            "class_": session_class,
            "join_transaction_mode": "create_savepoint",
        }
        self._maker: sessionmaker[ThreadSession] = sessionmaker(connection, **options)

    def make(self, **options: Any) -> ThreadSession:
        return self._maker(**_joined(options))

    def make_read(self, engine: AsyncEngine) -> GuardedSession | None:
        return None  # a SyncDatabase has no replicas


def _joined(options: dict[str, Any]) -> dict[str, Any]:
    """A session's own options (``db.scope(**options)``), still joined through a SAVEPOINT.

    A block's ``join_transaction_mode`` is about a Connection it is bound to, which in
    production it never is (its bind is the engine): here it would undo the test's
    isolation (``control_fully`` commits the test's transaction), so it is overridden.
    """
    if "join_transaction_mode" in options:
        return {**options, "join_transaction_mode": "create_savepoint"}
    return options


@asynccontextmanager
async def _outer_transaction(db: Database) -> AsyncIterator[AsyncConnection]:
    """A connection of ``db`` with an outer transaction, rolled back and closed at the end.

    The engine is disposed afterwards: its pooled connections belong to this test's
    event loop.
    """
    engine = db.engine
    try:
        connection = await engine.connect()
        try:
            await connection.begin()
            if connection.dialect.name == "sqlite":
                await _begin_sqlite(connection)
            yield connection
        finally:
            try:
                await connection.rollback()
            finally:
                await connection.close()
    finally:
        if db._owns_engine:
            await db.dispose()
        else:
            await engine.dispose()


@contextmanager
def _sync_outer_transaction(db: SyncDatabase) -> Iterator[Connection]:
    """:func:`_outer_transaction` for a ``SyncDatabase``.

    The engine is disposed afterwards too, so that no connection the app's sessions or
    lifespan checked out outlives the test in the pool.
    """
    engine = db.engine
    try:
        with engine.connect() as connection:
            connection.begin()
            if connection.dialect.name == "sqlite" and not _sqlite_in_transaction(connection):
                connection.exec_driver_sql("BEGIN")  # see _begin_sqlite
            try:
                yield connection
            finally:
                connection.rollback()
    finally:
        if db._owns_engine:
            db.dispose()
        else:
            engine.dispose()


async def _begin_sqlite(connection: AsyncConnection) -> None:
    # SQLAlchemy's begin() emits nothing with sqlite3/aiosqlite, which only emit BEGIN
    # before INSERT/UPDATE/DELETE; a SAVEPOINT outside a transaction starts one, and
    # its RELEASE commits.  So the outer transaction is begun explicitly (unless the
    # app's engine already applies SQLAlchemy's recipe and has begun it).
    raw = await connection.get_raw_connection()
    if not getattr(raw.driver_connection, "in_transaction", False):
        await connection.exec_driver_sql("BEGIN")


def _sqlite_in_transaction(connection: Connection) -> bool:
    return bool(getattr(connection.connection.driver_connection, "in_transaction", False))
