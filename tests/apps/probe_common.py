"""What the probe apps of the "any ASGI app" tests share (Falcon, BlackSheep, Django).

Each ``tests/apps/probe_<framework>.py`` serves the same routes, the way its framework
runs code (``async def`` handlers over a ``Database``; ``probe_django_sync`` runs
``def`` views over a ``SyncDatabase``), so that ``tests/_any_asgi.py`` checks the
package's promises in every one of them:

==============================  ========================================================
``GET /health``                 no database: ``{"connections_in_use": n}``
``GET /pool``                   connections checked out now, and checkouts so far
``POST /items/{key}/{status}``  insert ``key``, then answer ``status`` (400 or more: the
                                framework's own error response)
``POST /orphans/{key}``         insert ``key`` and an orphan child: the COMMIT fails
``POST /raises/{key}``          insert ``key``, then raise: the framework answers 500
``POST /streams/{key}``         insert ``key``, then a body ``written``, and once
                                released ``released``
``POST /waits/{key}``           insert ``key``, wait to be released, insert
                                ``{key}-late``, answer 201
``POST /releases/{key}``        release the stream or wait of ``key``
``POST /meets/{pair}``          a read, then wait for the other request of ``pair``;
                                answer the session's and the thread's identity
==============================  ========================================================

The test creates the tables (``items``, ``parents``, ``children``: see
``tests/_helpers.open_sync_database``) before it starts the server; the app reads the
URL from ``DATABASE_URL``.  Waits are bounded by :data:`RELEASE_TIMEOUT`, never slept.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import anyio
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asgi_sqla import Database

from .sync_common import RELEASE_TIMEOUT, CheckoutCounter, _enable_sqlite_foreign_keys

__all__ = [
    "DJANGO_LOGGING",
    "RELEASE_TIMEOUT",
    "AsyncGates",
    "AsyncProbe",
    "CheckoutCounter",
    "async_probe",
    "identity",
]


#: Django's ``LOGGING`` for the probes: ``django.request`` logs a view's exception (with
#: its traceback) to stderr, where the test reads it; Django's default sends it to the
#: console only when ``DEBUG`` is on.
DJANGO_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["stderr"], "level": "ERROR"}},
}


class AsyncCheckouts:
    """Counts the checkouts of a ``Database``'s pool (its engine exists only once started)."""

    def __init__(self) -> None:
        self.checkouts = 0
        self.db: Database | None = None

    def engine(self) -> AsyncEngine:
        """The engine factory: ``DATABASE_URL``, SQLite foreign keys on, checkouts counted."""
        engine = create_async_engine(os.environ["DATABASE_URL"])
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", _enable_sqlite_foreign_keys)
        event.listen(engine.sync_engine, "checkout", self._checked_out)
        return engine

    def _checked_out(self, *args: Any) -> None:
        self.checkouts += 1  # on the event loop's thread: no lock needed

    def report(self) -> dict[str, int]:
        assert self.db is not None
        return {"checked_out": self.db.pool_status().checked_out, "checkouts": self.checkouts}


class AsyncGates:
    """Events a handler waits on until the test releases it, and pairs that meet."""

    def __init__(self) -> None:
        self._released: dict[str, anyio.Event] = {}
        self._arrived: dict[str, int] = {}
        self._met: dict[str, anyio.Event] = {}

    def _event(self, key: str) -> anyio.Event:
        return self._released.setdefault(key, anyio.Event())

    async def wait(self, key: str) -> bool:
        """Wait for ``release(key)``; False after ``RELEASE_TIMEOUT``."""
        with anyio.move_on_after(RELEASE_TIMEOUT):
            await self._event(key).wait()
            return True
        return False

    def release(self, key: str) -> None:
        self._event(key).set()

    async def body(self, key: str) -> AsyncIterator[bytes]:
        """``written``, then once released ``released`` (``timed out`` otherwise)."""
        yield b"written\n"
        yield b"released\n" if await self.wait(key) else b"timed out\n"

    async def meet(self, pair: str) -> bool:
        """Wait until two requests of ``pair`` have arrived; False after the timeout."""
        met = self._met.setdefault(pair, anyio.Event())
        self._arrived[pair] = self._arrived.get(pair, 0) + 1
        if self._arrived[pair] == 2:
            met.set()
        with anyio.move_on_after(RELEASE_TIMEOUT):
            await met.wait()
            return True
        return False


class AsyncProbe(NamedTuple):
    db: Database
    checkouts: AsyncCheckouts
    gates: AsyncGates


def async_probe() -> AsyncProbe:
    """A ``Database`` on ``DATABASE_URL`` whose checkouts are counted, and the gates."""
    checkouts = AsyncCheckouts()
    db = Database(engine=checkouts.engine)
    checkouts.db = db
    return AsyncProbe(db, checkouts, AsyncGates())


async def write_item(db: Database, key: str) -> None:
    await db.session.execute(text("INSERT INTO items (key) VALUES (:key)"), {"key": key})


async def read(db: Database) -> None:
    """A statement that checks out a connection and writes nothing (SQLite takes readers
    at once, but only one writer)."""
    await db.session.execute(text("SELECT 1"))


async def write_orphan(db: Database, key: str) -> None:
    """An item and a child of a missing parent: the statements pass, the COMMIT fails."""
    await write_item(db, key)
    await db.session.execute(text("INSERT INTO children (id, parent_id) VALUES (1, 999999999)"))


def identity(session: object, met: bool) -> dict[str, Any]:
    """What ``/meets`` answers: which session and thread served the request."""
    return {"session": id(session), "thread": threading.get_ident(), "met": met}


class RaisedOnPurpose(RuntimeError):
    """What ``/raises`` raises after its write."""
