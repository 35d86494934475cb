"""What the ``SyncDatabase`` apps of ``tests/test_frameworks_sync.py`` share.

Each ``tests/apps/sync_<framework>.py`` serves the same routes, running the work below
in its framework's worker threads, the way that framework runs synchronous code:

=====================================  ==================================================
``GET /health``                        no database: ``health_report``
``GET /pool``                          ``CheckoutCounter.report``: connections checked
                                       out now, and checkouts since the process started
``POST /items/{key}/{status}``         ``write_item``, then answer ``status`` (a status of
                                       400 or more is raised as the framework's
                                       HTTP exception)
``POST /orphans/{key}``                ``write_orphan``: the COMMIT fails
``POST /streams/{key}``                ``write_item``, then ``Streams.body``: a body the
                                       client must release before it ends
``POST /releases/{key}``               ``Streams.release``
``GET /misuse``                        an ``async def`` endpoint using the sync session
=====================================  ==================================================

The test creates the tables (``items``, ``parents``, ``children``: see
``tests/_helpers.open_sync_database``) before it starts the server; the app reads the
URL from ``DATABASE_URL``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

from sqlalchemy import event, text
from sqlalchemy.orm import Session

from asgi_sqla import SyncDatabase

#: How long a streamed body waits for the client's release before it gives up.
RELEASE_TIMEOUT = 10.0


def _enable_sqlite_foreign_keys(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def health_report(db: SyncDatabase) -> dict[str, object]:
    """What ``/health`` answers: no session is read, so this request holds no connection."""
    return {"status": "ok", "connections_in_use": db.pool_status().checked_out}


class CheckoutCounter:
    """Counts the connections ``db``'s pool hands out, to show a request took none."""

    def __init__(self, db: SyncDatabase) -> None:
        self._db = db
        self._lock = threading.Lock()
        self.checkouts = 0
        event.listen(db.engine, "checkout", self._checked_out)

    def _checked_out(self, *args: Any) -> None:
        with self._lock:  # pool events fire in whichever thread checks out
            self.checkouts += 1

    def report(self) -> dict[str, int]:
        return {"checked_out": self._db.pool_status().checked_out, "checkouts": self.checkouts}


def write_item(session: Session, key: str) -> None:
    """Insert an ``items`` row: committed or not, the test reads it back by ``key``."""
    session.execute(text("INSERT INTO items (key) VALUES (:key)"), {"key": key})


def write_orphan(session: Session, key: str) -> None:
    """Insert an item and a child of a missing parent: the statements pass, the COMMIT fails.

    ``children.parent_id`` is a DEFERRABLE INITIALLY DEFERRED foreign key, checked at
    COMMIT.  Every such child is rolled back, so the same ``id`` can be used each time.
    """
    write_item(session, key)
    session.execute(text("INSERT INTO children (id, parent_id) VALUES (1, 999999999)"))


def misuse(session: Session) -> None:
    """A statement on the sync session, called by an ``async def`` endpoint on the event
    loop's thread: it raises ``BlockingCallError`` before it reaches the database."""
    session.execute(text("SELECT 1"))


class Streams:
    """Streamed bodies that end only when the client says so (``POST /releases/{key}``).

    The test reads the first line, looks at the database and the pool while the body
    is still going out, then releases it.  No sleep: the body waits on an event, in the
    worker thread the framework iterates it in.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._releases: dict[str, threading.Event] = {}

    def _event(self, key: str) -> threading.Event:
        with self._lock:
            return self._releases.setdefault(key, threading.Event())

    def body(self, key: str) -> Iterator[bytes]:
        """``written``, then once released ``released`` (``timed out`` after RELEASE_TIMEOUT)."""
        released = self._event(key)
        yield b"written\n"
        ended = released.wait(RELEASE_TIMEOUT)
        with self._lock:
            self._releases.pop(key, None)
        yield b"released\n" if ended else b"timed out\n"

    def release(self, key: str) -> None:
        self._event(key).set()


class AppParts(NamedTuple):
    """What each app is built around: its database, the checkout counter, the streams."""

    db: SyncDatabase
    counter: CheckoutCounter
    streams: Streams


def app_parts(db: SyncDatabase | None = None) -> AppParts:
    """``db`` (by default a ``SyncDatabase`` on ``DATABASE_URL``) with its helpers.

    On SQLite, foreign keys are turned on before the first connection, so that the
    COMMIT of ``children``'s deferred foreign key fails there too (SQLite checks them
    per connection, and only when asked).
    """
    if db is None:
        db = SyncDatabase(os.environ["DATABASE_URL"])
    if db.engine.dialect.name == "sqlite":
        event.listen(db.engine, "connect", _enable_sqlite_foreign_keys)
    return AppParts(db, CheckoutCounter(db), Streams())
