"""Turn-taking on a test's shared connections: who may use them now, and who waits.

One :class:`_Turns` per test holds its sessions' turns, under one lock, for async
sessions that wait in their task and synchronous ones that block their thread; the
``_lineage`` context variable lets the sessions opened inside a holder (later in its
task or thread call, or in the tasks, thread calls and requests it started) proceed.
Why sessions take turns is in the package's documentation (``asgi_sqla.pytest_plugin``);
the ways into the connection that take them are in ``_shared``, ``_async`` and
``_sync``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextvars import ContextVar
from typing import Protocol, cast

from sqlalchemy.orm import Session

from .._database import BaseDatabase
from .._errors import AsgiSqlaError, ConfigurationError
from .._session import sync_of
from .._threaded import ThreadSession
from .._unit import current_context

__all__ = ["DEFAULT_WAIT_TIMEOUT", "ConnectionTurnTimeout", "_Turns"]

#: Seconds a session may wait for its turn on the test's connection.
DEFAULT_WAIT_TIMEOUT = 10.0

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
_TIMEOUT = (
    "{who} waited {timeout:g} s for its turn on the test's connection to {db!r}, held by "
    "{holders}. In a test, all sessions share one connection and take turns: does a "
    "session stay open while its {waiter} waits for another request (or websocket) that "
    "needs the database? End it first (leave its db.scope() block), or raise "
    "asgi_sqla_wait_timeout if that request is merely slow."
)


class ConnectionTurnTimeout(AsgiSqlaError):
    """A session waited too long for its turn on the test's connection."""


class _TurnHolder(Protocol):
    """What the turns read and write on a session: its turn, and its database.

    The session classes that take turns (``_shared._SharedConnectionSession`` and those
    built on it) sit above this module, which names them by what it uses of them.
    """

    _asgi_sqla_db: BaseDatabase
    _asgi_sqla_turn: object | None


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

    async def take(self, session: _TurnHolder) -> None:
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

    def take_blocking(self, session: _TurnHolder) -> None:
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

    def take_now(self, session: _TurnHolder) -> None:
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

    def _hold(self, session: _TurnHolder, context: object, holder: str) -> None:
        token = object()
        self._holds[token] = _Hold(holder, context, current_context.get())
        session._asgi_sqla_turn = token
        _lineage.set(_lineage.get() | {token})

    def give_back(self, session: _TurnHolder) -> None:
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
        self, session: _TurnHolder, who: str, waiter: str, holders: str
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


def _request_context(session: _TurnHolder) -> object:
    """The request context whose own session ``session`` is, if it is one (else None)."""
    context = current_context.get()
    if context is not None:
        existing = context.existing(session._asgi_sqla_db)
        if existing is not None and sync_of(existing) is cast(Session, session):
            return context
    return None
