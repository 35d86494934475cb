"""The sessions of a ``SyncDatabase``: synchronous ``Session`` objects used in threads.

Frameworks run ``def`` endpoints and dependencies in worker threads (Starlette and
FastAPI through anyio's thread pool, Quart's ``run_sync``, Litestar's
``sync_to_thread``); that is where a ``SyncDatabase``'s session is used.  The guard of
``_session`` applies to it, with threads in the place of tasks:

* One call at a time.  Each call that reaches the database holds the session's
  reentrant lock; a call from a second thread meanwhile raises
  ``ConcurrentSessionUseError`` before SQLAlchemy starts it.  The COMMIT sent at the
  end of a ``with session.begin():`` block is checked when it starts, not held.
* Never on the event loop.  A call from the event loop's thread (an ``async def``
  endpoint using a synchronous session) raises ``BlockingCallError``, unless the
  database was made with ``block_event_loop=True``.
* The package ends the session in a worker thread (:func:`in_worker`), never on the
  event loop, and under a thread limit of its own, never the framework's: all of the
  framework's threads may be waiting for a connection that only an ending gives back.
  A session that holds nothing (no transaction, no callback) is closed in place,
  without a thread.
* The ending takes the session's lock, so it waits for a call still under way in an
  app thread (a cancelled request whose thread runs on: a thread cannot be
  interrupted).  When the ending rolls back, it first asks the driver to cancel that
  statement on the server (psycopg's ``cancel_safe()``/``cancel()``, psycopg2's
  ``cancel()``, sqlite3's ``interrupt()``) instead of waiting it out.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from anyio import CapacityLimiter, to_thread
from anyio.lowlevel import RunVar
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ._errors import BlockingCallError, ConcurrentSessionUseError, SessionEndedError
from ._log import logger
from ._lost_commits import confirm_here, probing
from ._session import (
    GuardedSession,
    _ending,
    _GuardedSyncSession,
    count_as_committed,
    retire,
    run_committed_callbacks_here,
    run_to_completion,
)

__all__ = [
    "AnySession",
    "ThreadSession",
    "check_off_loop",
    "end_thread_session",
    "in_worker",
    "thread_class",
]

_T = TypeVar("_T")

#: Threads the package's endings, startup checks and disposals may use at once.  An
#: ending holds a connection, so this bounds endings running at once, not requests.
_WORKERS = 64

_ON_LOOP = (
    "A synchronous Session ran a database call in the event loop's thread (an `async "
    "def` endpoint or dependency?), which stops every other request until the database "
    "answers. Make the endpoint a plain `def` (frameworks run it in a worker thread), "
    "or use an async Database there. For tests on SQLite, "
    "SyncDatabase(..., block_event_loop=True) allows it."
)
_CONCURRENT_THREADS = (
    "Thread {thread!r} used a session of a SyncDatabase while thread {owner!r} was still "
    "inside a call on it. A Session is not safe for concurrent use: give each thread "
    "its own session with `with db.new_session() as session:`."
)


class ThreadSession(_GuardedSyncSession):
    """The guard for threads, mixed in above a ``SyncDatabase``'s session class."""

    #: The database allows calls from the event loop's thread (``block_event_loop``).
    _asgi_sqla_loop_allowed = False
    #: The thread that last entered a call (named by the concurrency error).
    _asgi_sqla_user: threading.Thread | None = None
    #: The connection of the current transaction, whose statement an ending may cancel.
    _asgi_sqla_connection: Connection | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._asgi_sqla_lock = threading.RLock()

    def _guarded(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        _check_thread(self)
        lock = self._asgi_sqla_lock
        if not lock.acquire(blocking=False):
            _refuse(self)
        try:
            self._asgi_sqla_user = threading.current_thread()
            return super()._guarded(call, *args, **kwargs)
        finally:
            lock.release()

    def commit(self) -> None:
        try:
            super().commit()
        except DBAPIError:
            # As ``GuardedSession.commit``: the COMMIT itself failed, and the connection's
            # state is not known (SQLite keeps the failed transaction open, with its write
            # lock, and the pool would not roll it back).  Discard it.
            _invalidate(self)
            raise


#: A session a ``Database`` makes (``AsyncSession``) or a ``SyncDatabase`` makes (``Session``).
AnySession = GuardedSession | ThreadSession


@event.listens_for(ThreadSession, "before_commit")
def _before_commit(session: ThreadSession) -> None:
    # The end of a `with session.begin():` block commits without passing commit():
    # check here that no other thread is inside a call.
    _check_thread(session)
    lock = session._asgi_sqla_lock
    if not lock.acquire(blocking=False):
        _refuse(session)
    lock.release()


@event.listens_for(ThreadSession, "after_begin")
def _remember_connection(session: ThreadSession, transaction: Any, connection: Any) -> None:
    session._asgi_sqla_connection = connection


@event.listens_for(ThreadSession, "after_transaction_end")
def _forget_connection(session: ThreadSession, transaction: Any) -> None:
    if transaction.parent is None:
        session._asgi_sqla_connection = None


def _check_thread(session: ThreadSession) -> None:
    if _ending.get() is not session:
        check_off_loop(session._asgi_sqla_loop_allowed)


def check_off_loop(allowed: bool) -> None:
    """Raise ``BlockingCallError`` in the event loop's thread, unless ``allowed``."""
    if not allowed and asyncio._get_running_loop() is not None:
        raise BlockingCallError(_ON_LOOP)


def _refuse(session: ThreadSession) -> None:
    """Raise for a call while another thread is inside one (or the package ends it)."""
    ended = session._asgi_sqla_ended
    if ended is not None and _ending.get() is not session:
        raise SessionEndedError(ended)
    owner = session._asgi_sqla_user
    raise ConcurrentSessionUseError(
        _CONCURRENT_THREADS.format(
            thread=threading.current_thread().name,
            owner=owner.name if owner is not None else "unknown",
        )
    )


@functools.cache
def thread_class(cls: type[Session], loop_allowed: bool) -> type[ThreadSession]:
    """``cls`` with the thread guard mixed in."""
    return type(
        f"Thread{cls.__name__}", (ThreadSession, cls), {"_asgi_sqla_loop_allowed": loop_allowed}
    )


#: The package's own share of anyio's worker threads, per event loop.
_limiter: RunVar[CapacityLimiter] = RunVar("asgi_sqla_limiter")


async def in_worker(fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn(*args)`` in a worker thread, in a copy of this context.

    The thread is one of anyio's, which Starlette, FastAPI and Litestar run ``def``
    code in: the one that just finished the endpoint is usually idle and is reused,
    which costs far less than waking a thread of another pool.  The calls count
    against a limiter of the package's own, never the framework's: all the framework's
    tokens may be held by endpoints waiting for a connection that only an ending here
    gives back, and anyio starts a new thread whenever none is idle.
    """
    try:
        limiter = _limiter.get()
    except LookupError:
        limiter = CapacityLimiter(_WORKERS)
        _limiter.set(limiter)
    return await to_thread.run_sync(fn, *args, limiter=limiter)


async def end_thread_session(
    session: ThreadSession, *, commit: bool, reason: str, here: bool
) -> None:
    """Commit (or roll back) and close ``session``, returning its connection.

    Like ``_session.end_session``: the session is retired first, and the work is
    shielded from cancellation.  It runs in a worker thread (:func:`in_worker`), or in
    this thread when ``here`` (an ending driven synchronously: ``db.scope()``,
    ``db.release()`` in a worker thread), or in place when the session holds nothing.
    """
    retire(session, reason)
    if here:
        _end_here(session, commit)
    elif not _closed_if_idle(session):
        await run_to_completion(in_worker(_end_here, session, commit))


def _closed_if_idle(session: ThreadSession) -> bool:
    """Close ``session`` now if that sends nothing to the database; whether it did."""
    lock = session._asgi_sqla_lock
    if not lock.acquire(blocking=False):
        return False
    try:
        if (
            session.get_transaction() is not None
            or session._asgi_sqla_on_commit
            or session._asgi_sqla_before_commit
        ):
            return False
        token = _ending.set(session)
        try:
            session.close()  # no transaction: nothing to roll back, no connection
        finally:
            _ending.reset(token)
        return True
    finally:
        lock.release()


def _end_here(session: ThreadSession, commit: bool) -> None:
    """End ``session`` in this thread, once no other thread is inside a call on it."""
    token = _ending.set(session)
    try:
        lock = session._asgi_sqla_lock
        if not lock.acquire(blocking=False):
            if not commit:
                _cancel_statement(session)  # its transaction is rolled back anyway
            lock.acquire()  # a thread cannot be interrupted: wait for the call to return
        try:
            if commit and session._asgi_sqla_rollback_only is None:
                try:
                    with probing(session._asgi_sqla_on_commit) as probe:
                        session.commit()
                except BaseException as exc:
                    # The connection's state is not known after a failed COMMIT (see
                    # ``_session._end``): discard it, then ask about a lost COMMIT.
                    _invalidate(session)
                    if not confirm_here(probe, exc):
                        raise
                    count_as_committed(session, probe.due)
            try:
                session.close()  # rolls back whatever is still open
            except Exception:
                logger.warning(
                    "Could not roll back and close a session; invalidating its connection.",
                    exc_info=True,
                )
                _invalidate(session)
        finally:
            lock.release()
        run_committed_callbacks_here(session)
    finally:
        _ending.reset(token)


def _invalidate(session: Session) -> None:
    try:
        session.invalidate()
    except Exception:
        logger.exception("Could not invalidate a session's connection.")


#: The drivers' ways to stop a running statement from another thread, by preference.
_CANCEL_METHODS = ("cancel_safe", "cancel", "interrupt")


def _cancel_statement(session: ThreadSession) -> None:
    """Ask the server to cancel the statement a thread is running on ``session``."""
    connection = session._asgi_sqla_connection
    if connection is None:
        return
    try:
        driver = connection.connection.driver_connection
        for name in _CANCEL_METHODS:
            cancel = getattr(driver, name, None)
            if cancel is not None:
                cancel()
                return
    except Exception:  # the statement then runs to its end, and the ending waits
        logger.debug("Could not cancel a running statement.", exc_info=True)
