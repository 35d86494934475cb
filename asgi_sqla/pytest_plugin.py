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

import asyncio
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar, cast, overload

import pytest
from sqlalchemy import Connection, event
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    AsyncSessionTransaction,
    async_sessionmaker,
)
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from ._database import BaseDatabase, Database
from ._errors import AsgiSqlaError, ConfigurationError
from ._session import _GUARDED_METHODS, GuardedSession, guarded_class, sync_of
from ._syncdb import SyncDatabase
from ._threaded import ThreadSession
from ._unit import current_context

__all__ = [
    "ConnectionTurnTimeout",
    "OuterTransaction",
    "SyncOuterTransaction",
    "rolled_back",
    "rolled_back_sync",
]

_C = TypeVar("_C")

#: Seconds a session may wait for its turn on the test's connection.
DEFAULT_WAIT_TIMEOUT = 10.0

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
_ASYNC_IN_ROLLED_BACK_SYNC = (
    "rolled_back_sync() binds SyncDatabase objects, and {db!r} is an async Database: "
    "bind it with `async with rolled_back(...)` in an async test, which also takes "
    "SyncDatabase objects."
)
_OTHER_LOOP = (
    "A session of {db!r} was used on another event loop than the one the test's "
    "transaction belongs to. Is the app called through Starlette's TestClient, which "
    "runs it in a thread with its own loop? Call it from the async test instead: "
    "httpx.AsyncClient(transport=httpx.ASGITransport(app=app))."
)
_NO_TURN = (
    "A session of {db!r} began a transaction on the test's connection while {holders} "
    "held it, without waiting for its turn (this code path is not covered by the "
    "plugin: please report it). {fix}"
)
_NO_TURN_FIX_ASYNC = "Run the statement through the session's async methods."
_NO_TURN_FIX_SYNC = "Run the statement through session.execute() or session.flush()."
_NOT_INNERMOST = (
    "A session of {db!r} is ending while a session opened after it on the test's "
    "connection is still open. In a test all sessions share one connection, where "
    "savepoints form a stack, so a session opened inside another must end first. This "
    "happens when db.session is first used inside a db.new_session() or db.scope() block "
    "of the same request: use db.session once before the block, or end the block first."
)
_TIMEOUT = (
    "{who} waited {timeout:g} s for its turn on the test's connection to {db!r}, held by "
    "{holders}. In a test, all sessions share one connection and take turns: does a "
    "session stay open while its {waiter} waits for another request (or websocket) that "
    "needs the database? End it first (leave its db.scope() block), or raise "
    "asgi_sqla_wait_timeout if that request is merely slow."
)


class ConnectionTurnTimeout(AsgiSqlaError):
    """A session waited too long for its turn on the test's connection."""


#: The turns taken in this task or thread call, and in the tasks, worker-thread calls
#: and requests it started after taking them (they run in copies of its context).
_lineage: ContextVar[frozenset[object]] = ContextVar("_lineage", default=frozenset())


class _Hold:
    """One session's turn: who took it, for which request context, in which unit."""

    __slots__ = ("context", "holder", "unit")

    def __init__(self, holder: str, context: object, unit: object) -> None:
        self.holder = holder
        self.context = context  # the request context whose own session took it, if any
        self.unit = unit  # the request (or db.scope()) whose code took it


class _Turns:
    """Who may use the test's connections now.

    A hold is allowed when every current hold is an ancestor of the asking session:
    taken earlier in the same task or thread call, or in one whose context the asking
    one's was copied from (the ``_lineage`` context variable), or held by another
    session of the same request context (those are on other databases' connections:
    one session per database).  A synchronous session also proceeds past a hold taken
    in the code of its own request: a framework runs a request's ``def`` dependencies
    and endpoint one after another, each in a thread call of its own, so a
    ``db.new_session()`` block in the endpoint nests in the session a dependency used.

    Async sessions wait in their task (:meth:`take`), synchronous ones block their
    thread (:meth:`take_blocking`); both kinds share the holds, under one lock, so a
    test with both kinds of database has one turn.  ``loop`` is the test's event loop
    (None for a synchronous test, which binds no async database).
    """

    def __init__(self, timeout: float, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.timeout = timeout
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # for the blocked threads
        self._holds: dict[object, _Hold] = {}
        self._waiters: list[asyncio.Future[None]] = []  # for the waiting tasks

    def _allowed(self, context: object, unit: object) -> bool:
        """Whether a session may hold now (``unit``: its request's, for a sync session)."""
        lineage = _lineage.get()
        return all(
            token in lineage
            or (context is not None and hold.context is context)
            or (unit is not None and hold.unit is unit)
            for token, hold in self._holds.items()
        )

    async def take(self, session: _SharedConnectionSession) -> None:
        """Wait until ``session`` (an async one) may use the connection; mark it as holding."""
        if session._asgi_sqla_turn is not None:
            return
        loop = asyncio.get_running_loop()
        if loop is not self.loop:
            raise ConfigurationError(_OTHER_LOOP.format(db=session._asgi_sqla_db))
        context = _request_context(session)
        deadline = loop.time() + self.timeout
        while True:
            with self._lock:
                if self._allowed(context, None):
                    self._hold(session, context, _task_name())
                    return
                waiter = loop.create_future()
                self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                with self._lock:
                    holders = self._holders()
                raise self._timeout(session, _task_name(), "task", holders) from None
            finally:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
            if session._asgi_sqla_turn is not None:  # taken meanwhile by the session's events
                return

    def take_blocking(self, session: _SharedConnectionSession) -> None:
        """Block until ``session`` (a synchronous one) may use the connection; mark it."""
        if session._asgi_sqla_turn is not None:
            return
        context = _request_context(session)
        unit = current_context.get()
        deadline = time.monotonic() + self.timeout
        with self._changed:
            while not self._allowed(context, unit):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout(session, _thread_name(), "thread", self._holders())
                self._changed.wait(remaining)
            self._hold(session, context, _thread_name())

    def take_now(self, session: _SharedConnectionSession) -> None:
        """Mark ``session`` as holding, if allowed without waiting; raise otherwise."""
        if session._asgi_sqla_turn is not None:
            return
        context = _request_context(session)
        with self._lock:
            unit = current_context.get() if isinstance(session, ThreadSession) else None
            if not self._allowed(context, unit):
                fix = (
                    _NO_TURN_FIX_SYNC if isinstance(session, ThreadSession) else _NO_TURN_FIX_ASYNC
                )
                raise AsgiSqlaError(
                    _NO_TURN.format(db=session._asgi_sqla_db, holders=self._holders(), fix=fix)
                )
            self._hold(session, context, _holder_name())

    def _hold(self, session: _SharedConnectionSession, context: object, holder: str) -> None:
        token = object()
        self._holds[token] = _Hold(holder, context, current_context.get())
        session._asgi_sqla_turn = token
        _lineage.set(_lineage.get() | {token})

    def give_back(self, session: _SharedConnectionSession) -> None:
        """End ``session``'s hold, if it has one, and let the waiting sessions check again.

        Called from any thread: a synchronous session is often closed in another
        thread than the one that took its turn.
        """
        token = session._asgi_sqla_turn
        if token is None:
            return
        with self._lock:
            session._asgi_sqla_turn = None
            del self._holds[token]
            waiters, self._waiters = self._waiters, []
            self._changed.notify_all()
        lineage = _lineage.get()
        if token in lineage:  # no use any more: keep long-lived contexts from growing
            _lineage.set(lineage - {token})
        if not waiters:
            return
        loop = self.loop
        assert loop is not None  # only async sessions wait in tasks, on the test's loop
        if asyncio._get_running_loop() is loop:
            _wake(waiters)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(_wake, waiters)

    def _timeout(
        self, session: _SharedConnectionSession, who: str, waiter: str, holders: str
    ) -> ConnectionTurnTimeout:
        return ConnectionTurnTimeout(
            _TIMEOUT.format(
                who=who,
                timeout=self.timeout,
                db=session._asgi_sqla_db,
                holders=holders,
                waiter=waiter,
            )
        )

    def _holders(self) -> str:
        """Who holds the turn now (with the lock held)."""
        return ", ".join(hold.holder for hold in self._holds.values()) or "nobody"


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def _task_name() -> str:
    task = asyncio.current_task()
    return f"task {task.get_name()!r}" if task is not None else "code outside any task"


def _thread_name() -> str:
    return f"thread {threading.current_thread().name!r}"


def _holder_name() -> str:
    """The task (on an event loop) or else the thread that takes a turn now."""
    if asyncio._get_running_loop() is not None:
        return _task_name()
    return _thread_name()


def _request_context(session: _SharedConnectionSession) -> object:
    """The request context whose own session ``session`` is, if it is one (else None)."""
    context = current_context.get()
    if context is not None:
        existing = context.existing(session._asgi_sqla_db)
        if existing is not None and sync_of(existing) is cast(Session, session):
            return context
    return None


class _SharedConnectionSession(Session):
    """The synchronous side of a session bound to the test's connection.

    For an async ``Database`` it is the ``AsyncSession``'s ``sync_session``; for a
    ``SyncDatabase``, the session itself (with :class:`_ThreadTurnTaking`).  It carries
    the session's turn (so that SQLAlchemy's session events see it too), and pins
    ``twophase`` off: a two-phase session would begin a transaction of its own on the
    test's connection, where one is already open (with ``two_phase=True`` the
    middleware commits the databases of a test in one phase).
    """

    _asgi_sqla_turns: _Turns
    _asgi_sqla_db: BaseDatabase
    #: The sessions whose savepoint is open on the connection, innermost last.
    _asgi_sqla_stack: list[_SharedConnectionSession]
    _asgi_sqla_turn: object | None = None

    @property
    def twophase(self) -> bool:
        return False

    @twophase.setter
    def twophase(self, value: bool) -> None:
        pass


def _after_begin(session: Session, transaction: SessionTransaction, connection: Any) -> None:
    # Every way into the connection the plugin knows of takes the turn first; this is
    # the net under them, so that a path it missed fails loudly instead of
    # interleaving savepoints.
    if transaction.parent is None:
        shared = cast(_SharedConnectionSession, session)
        shared._asgi_sqla_turns.take_now(shared)
        shared._asgi_sqla_stack.append(shared)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        stack = cast(_SharedConnectionSession, session)._asgi_sqla_stack
        if session in stack:
            stack.remove(session)


def _check_innermost(shared: _SharedConnectionSession) -> None:
    """Refuse to end a session whose savepoint has another session's on top of it.

    Its RELEASE or ROLLBACK TO would end that one's savepoint too, under it.
    """
    stack = shared._asgi_sqla_stack
    if stack and stack[-1] is not shared and shared in stack:
        raise AsgiSqlaError(_NOT_INNERMOST.format(db=shared._asgi_sqla_db))


def _check_deferred_constraints(session: Session) -> None:
    """Check PostgreSQL's deferred constraints now, where the app's COMMIT would."""
    if session.in_nested_transaction() or not session.in_transaction():
        return  # the app's own begin_nested(): releasing it checks nothing in production
    session.flush()
    connection = session.connection()
    connection.exec_driver_sql("SAVEPOINT asgi_sqla_check")
    try:
        connection.exec_driver_sql("SET CONSTRAINTS ALL IMMEDIATE")
    finally:
        # Rolling back restores every constraint's mode and leaves the pending checks
        # pending (PostgreSQL undoes both with the subtransaction).
        connection.exec_driver_sql("ROLLBACK TO SAVEPOINT asgi_sqla_check")
        connection.exec_driver_sql("RELEASE SAVEPOINT asgi_sqla_check")


def _listen_for_turns(sync_class: type[Session], dialect: str) -> None:
    """The events of a class of sessions bound to the test's connection to ``dialect``."""
    event.listen(sync_class, "after_begin", _after_begin)
    event.listen(sync_class, "after_transaction_end", _after_transaction_end)
    if dialect == "postgresql":
        event.listen(sync_class, "before_commit", _check_deferred_constraints)


# -- async sessions ----------------------------------------------------------------------


class _TurnTakingTransaction(AsyncSessionTransaction):
    """``session.begin()``: the turn is taken before the transaction begins."""

    __slots__ = ()

    async def __aenter__(self) -> AsyncSessionTransaction:
        await _take_turn(self.session)
        return await super().__aenter__()


class _TurnTaking(AsyncSession):
    """Mixed in below the guard of the sessions bound to the test's connection.

    Every method that reaches the database first waits for the session's turn; closing
    the session gives the turn back.  (Placed after ``GuardedSession`` in the class
    order, so the guard's checks run first, and the package's own cleanup, which
    reaches past the guard, still passes through here.)
    """

    def begin(self) -> AsyncSessionTransaction:
        return _TurnTakingTransaction(self)

    def begin_nested(self) -> AsyncSessionTransaction:
        return _TurnTakingTransaction(self, nested=True)

    async def close(self) -> None:
        await self._ending(super().close)

    async def reset(self) -> None:
        await self._ending(super().reset)

    async def _ending(self, end: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Close or reset (only the innermost session may), then give the turn back."""
        shared = _shared(self)
        try:
            _check_innermost(shared)
            await end()
        finally:
            shared._asgi_sqla_turns.give_back(shared)

    async def invalidate(self) -> None:
        # The package invalidates a connection whose state it cannot trust (after a
        # failed commit).  This one is the test's, shared by every session, and its
        # state is known: the session's savepoint.  Roll back to it; keep the connection.
        await _TurnTaking.close(self)


def _shared(session: AsyncSession) -> _SharedConnectionSession:
    return cast(_SharedConnectionSession, session.sync_session)


async def _take_turn(session: AsyncSession) -> None:
    shared = _shared(session)
    await shared._asgi_sqla_turns.take(shared)


def _taking_turn(name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    method = getattr(AsyncSession, name)
    ends = name in ("commit", "rollback")

    @functools.wraps(method)
    async def taking_turn(self: _TurnTaking, *args: Any, **kwargs: Any) -> Any:
        await _take_turn(self)
        if ends:
            _check_innermost(_shared(self))
        return await getattr(super(_TurnTaking, self), name)(*args, **kwargs)

    return taking_turn


for _name in _GUARDED_METHODS:
    if hasattr(AsyncSession, _name):  # delete_all and merge_all are new in 2.1
        setattr(_TurnTaking, _name, _taking_turn(_name))


def _session_classes(
    db: Database, turns: _Turns, dialect: str
) -> tuple[type[AsyncSession], type[Session]]:
    """The async and sync session classes of ``db``'s sessions during one test."""
    options = db._session_options
    sync_base: type[Session] = options.get("sync_session_class", Session)
    sync_class = type(
        f"Shared{sync_base.__name__}",
        (_SharedConnectionSession, sync_base),
        {"_asgi_sqla_turns": turns, "_asgi_sqla_db": db, "_asgi_sqla_stack": []},
    )
    _listen_for_turns(sync_class, dialect)
    return _turn_taking_class(options["class_"]), sync_class


@functools.cache
def _turn_taking_class(guarded: type[AsyncSession]) -> type[AsyncSession]:
    """``guarded`` (the Database's session class) with :class:`_TurnTaking` below its guard."""
    return type(f"Shared{guarded.__name__}", (guarded, _TurnTaking), {})


# -- synchronous sessions ----------------------------------------------------------------


class _ThreadTurnTaking(_SharedConnectionSession):
    """Mixed in below the thread guard (and the app's class) of a ``SyncDatabase``'s
    sessions bound to the test's connection.

    Every way into the connection first blocks until the session has the turn; closing
    the session, in whichever thread, gives it back.  The package ends a session by
    calling ``commit()`` and ``close()`` (or ``invalidate()``) on it in a worker thread,
    and those calls reach the database through here, past the guard, like the app's.
    """

    def _connection_for_bind(self, *args: Any, **kwargs: Any) -> Any:
        # Every statement (execute(), scalars(), get(), lazy loads) and connection().
        self._asgi_sqla_turns.take_blocking(self)
        return super()._connection_for_bind(*args, **kwargs)

    def flush(self, objects: Any = None) -> None:
        # A flush reaches the connection through the SessionTransaction, not the above.
        self._asgi_sqla_turns.take_blocking(self)
        super().flush(objects)

    def bulk_save_objects(self, *args: Any, **kwargs: Any) -> None:
        self._asgi_sqla_turns.take_blocking(self)  # also through the SessionTransaction
        super().bulk_save_objects(*args, **kwargs)

    def bulk_insert_mappings(self, *args: Any, **kwargs: Any) -> None:
        self._asgi_sqla_turns.take_blocking(self)
        super().bulk_insert_mappings(*args, **kwargs)

    def bulk_update_mappings(self, *args: Any, **kwargs: Any) -> None:
        self._asgi_sqla_turns.take_blocking(self)
        super().bulk_update_mappings(*args, **kwargs)

    def commit(self) -> None:
        # Its flush and statements take the turn if needed; nothing is sent otherwise.
        _check_innermost(self)
        super().commit()

    def rollback(self) -> None:
        _check_innermost(self)
        super().rollback()

    def close(self) -> None:
        self._ending(super().close)

    def reset(self) -> None:
        self._ending(super().reset)

    def invalidate(self) -> None:
        # As for async sessions: roll back to the savepoint, keep the test's connection.
        self._ending(super().close)

    def _ending(self, end: Callable[[], None]) -> None:
        """Close or reset (only the innermost session may), then give the turn back."""
        try:
            _check_innermost(self)
            end()
        finally:
            self._asgi_sqla_turns.give_back(self)


def _thread_session_class(db: SyncDatabase, turns: _Turns, dialect: str) -> type[ThreadSession]:
    """The class of ``db``'s sessions during one test: its own with turn-taking below."""
    guarded: type[ThreadSession] = db._session_options["class_"]
    shared = type(
        f"Shared{guarded.__name__}",
        (guarded, _ThreadTurnTaking),
        {"_asgi_sqla_turns": turns, "_asgi_sqla_db": db, "_asgi_sqla_stack": []},
    )
    _listen_for_turns(shared, dialect)
    return shared


# -- the outer transactions --------------------------------------------------------------


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
        return self._maker(**options)

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
        return self._maker(**options)

    def make_read(self, engine: AsyncEngine) -> GuardedSession | None:
        return None  # a SyncDatabase has no replicas


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
