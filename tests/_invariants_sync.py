"""The sync variant of ``tests/test_invariants.py``: app threads that pause where the machine says.

A ``SyncDatabase``'s session is used in worker threads, and a thread cannot be
interrupted: the interesting interleavings are those where the machine acts (cancels
the request, has a second thread use the session) while an app thread is still at
work.  A :class:`Pause` is one such thread, stopped either *inside a statement* (the
statement is running on the server and the thread holds the session's lock) or
*between two statements* (the thread does something else, holding nothing), until the
machine lets it go on.  Nothing sleeps to synchronise: the thread reports that it
paused and finished through futures of the machine's event loop, and the statement
waits for an event or a lock the machine releases.

How a statement is made to wait depends on the database (:class:`WaitingStatements`):

* SQLite (:class:`SQLiteWaits`): a recursive query that asks a function of the
  machine's, once per row, whether to go on.  Each call waits at most ``SLICE``
  seconds for the machine's event, so the statement is a long-running one that
  ``sqlite3``'s ``interrupt()`` stops between two rows, as it would a real one.
* PostgreSQL (:class:`PostgresWaits`): ``pg_advisory_xact_lock(n)`` on a lock the
  machine's admin connection holds; the machine polls ``pg_stat_activity`` (another
  process: polling with a deadline) until the backend waits for it.  A cancel request
  from the package ends the wait with ``QueryCanceled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, TextClause, event, text

#: Seconds one call of SQLite's ``machine_waits()`` waits for the machine before the
#: query goes on to its next row (where an ``interrupt()`` takes effect).
SLICE = 0.005
#: Seconds between two looks at ``pg_stat_activity`` while a statement gets going.
POLL_INTERVAL = 0.005


@dataclass(eq=False)
class Pause:
    """An app thread stopped where the machine wanted it, until :meth:`let_go`."""

    number: int
    #: Inside a statement (holding the session's lock), or between two statements.
    inside: bool
    #: What the thread does once it goes on: "nothing", "write" or "commit".
    then: str
    waits: WaitingStatements
    loop: asyncio.AbstractEventLoop
    entered: asyncio.Future[None]
    #: What came of the thread's work, set from the thread when it is over.
    finished: asyncio.Future[str]
    resume: threading.Event = field(default_factory=threading.Event)
    #: The model of the session the thread was using when it paused (None: no session).
    model: Any = None
    #: The writes that session's transaction held then: what a later ``db.commit()``
    #: in this thread claims to commit.
    pending: list[str] = field(default_factory=list)
    #: The request's context, for a second thread to use its session.
    context: contextvars.Context | None = None
    #: The instruction the app's task is carrying out (its ``await`` of the thread).
    done: asyncio.Future[str] | None = None
    _signalled: bool = False

    @classmethod
    def new(cls, number: int, inside: bool, then: str, waits: WaitingStatements) -> Pause:
        loop = asyncio.get_running_loop()
        return cls(number, inside, then, waits, loop, loop.create_future(), loop.create_future())

    def signal_entered(self) -> None:
        """Called in the app thread: it has paused (more calls change nothing)."""
        if not self._signalled:
            self._signalled = True
            self._tell(self.entered, None)

    def finish(self, result: str) -> None:
        """Called in the app thread: its work is over."""
        self._tell(self.finished, result)

    def _tell(self, future: asyncio.Future[Any], value: Any) -> None:
        # After an example that failed, the loop may be closed: nobody waits any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_set, future, value)

    def let_go(self) -> None:
        """Let the thread go on (its statement finishes); calling it again changes nothing."""
        if not self.resume.is_set():
            self.resume.set()
            if self.inside:
                self.waits.let_go(self.number)

    async def until_paused(self, limit: float) -> None:
        """Return once the thread has paused, or finished without pausing."""
        if self.inside:
            await self.waits.until_running(self, limit)
        else:
            await until_either(self.entered, self.finished, limit)


def _set(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


async def until_either(
    first: asyncio.Future[Any], second: asyncio.Future[Any], limit: float
) -> None:
    await asyncio.wait({first, second}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    if not first.done() and not second.done():
        raise AssertionError(f"an app thread neither paused nor finished within {limit} s")


class WaitingStatements(ABC):
    """Statements that run until the machine lets them finish, on one kind of database."""

    @abstractmethod
    def statement(self, number: int) -> TextClause:
        """The statement the app thread of pause ``number`` runs."""

    @abstractmethod
    def hold(self, number: int) -> None:
        """Before the thread starts: make statement ``number`` wait once it runs."""

    @abstractmethod
    def let_go(self, number: int) -> None:
        """Statement ``number`` may finish (the pause's event is set already)."""

    @abstractmethod
    def let_all_go(self) -> None:
        """At the end of an example: nothing may still be waiting."""

    async def until_running(self, pause: Pause, limit: float) -> None:
        """Return once ``pause``'s statement runs on the server (or its thread finished)."""
        await until_either(pause.entered, pause.finished, limit)


class SQLiteWaits(WaitingStatements):
    """A query that runs row after row while ``machine_waits(n)`` says so."""

    def __init__(self, engine: Engine, pauses: dict[int, Pause]) -> None:
        self._pauses = pauses
        event.listen(engine, "connect", self._register)
        engine.dispose()  # pooled connections made before the listener lack the function

    def _register(self, dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.create_function("machine_waits", 1, self._waits)

    def _waits(self, number: int) -> int:
        pause = self._pauses[number]
        pause.signal_entered()
        return 0 if pause.resume.wait(SLICE) else 1

    # The query waits for the pause's event, which the pause sets itself.

    def hold(self, number: int) -> None:
        pass

    def let_go(self, number: int) -> None:
        pass

    def let_all_go(self) -> None:
        pass

    def statement(self, number: int) -> TextClause:
        return text(
            "WITH RECURSIVE spin(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM spin "
            f"WHERE machine_waits({number})) SELECT count(*) FROM spin"
        )


class PostgresWaits(WaitingStatements):
    """``pg_advisory_xact_lock(n)`` on an advisory lock the admin connection holds."""

    def __init__(self, admin: Any, application_name: str) -> None:
        self._admin = admin  # a sync autocommit psycopg connection (the pg_admin fixture)
        self._application_name = application_name

    def statement(self, number: int) -> TextClause:
        # A transaction-level lock: once granted, it goes with the app's transaction.
        return text(f"SELECT pg_advisory_xact_lock({number})")

    def hold(self, number: int) -> None:
        self._admin.execute("SELECT pg_advisory_lock(%s)", (number,))

    def let_go(self, number: int) -> None:
        self._admin.execute("SELECT pg_advisory_unlock(%s)", (number,))

    def let_all_go(self) -> None:
        self._admin.execute("SELECT pg_advisory_unlock_all()")

    async def until_running(self, pause: Pause, limit: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        like = f"%pg_advisory_xact_lock({pause.number})%"
        while not pause.finished.done():
            waiting = self._admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = %s AND wait_event_type = 'Lock' AND query LIKE %s",
                (self._application_name, like),
            ).fetchone()
            if waiting is not None:
                return
            if loop.time() > deadline:
                raise AssertionError(f"statement {pause.number} never ran on the server")
            await asyncio.sleep(POLL_INTERVAL)  # polling the server, bounded by the deadline
