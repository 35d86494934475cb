"""The session class handed to applications, and how a session is ended.

Sessions made by a ``Database`` are ``AsyncSession`` subclasses with a small guard
on their async methods.  The guard does two things SQLAlchemy cannot do for us:

* It turns concurrent use of one session by two tasks into a clear
  ``ConcurrentSessionUseError`` *before* SQLAlchemy starts the second operation.
  SQLAlchemy's own error for this arrives mid-operation and leaves the session in a
  state its owner can no longer close cleanly.
* It retires a session once the package has ended it, so a stale reference kept
  past ``db.release()`` or past the end of the request cannot silently check out a
  connection that nobody will give back.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession

from ._errors import ConcurrentSessionUseError, RollbackOnlyError, SessionEndedError

logger = logging.getLogger("asgi_sqla")

_T = TypeVar("_T")

#: The ``AsyncSession`` coroutine methods that touch the database.  ``scalar()`` and
#: ``scalars()`` call ``execute()`` internally, so the guard is re-entrant per task.
_GUARDED_METHODS = (
    "execute",
    "scalar",
    "scalars",
    "get",
    "get_one",
    "stream",
    "stream_scalars",
    "delete",
    "delete_all",
    "merge",
    "merge_all",
    "flush",
    "refresh",
    "run_sync",
    "connection",
    "commit",
    "rollback",
)

#: Methods that only release resources: calling them on a session the package has
#: already ended is harmless, so they do nothing instead of raising.
_CLEANUP_METHODS = ("close", "aclose", "reset", "invalidate")

_CONCURRENT_USE = (
    "{task} used db.session while {owner} was still using it. An AsyncSession is not "
    "safe for concurrent use: give each concurrent task its own session with "
    "`async with db.new_session() as session:`."
)


ROLLBACK_ONLY = (
    "This transaction was marked rollback-only with db.set_rollback_only(), so it cannot "
    "commit. Remove that call, or let the transaction roll back."
)
READ_ONLY = (
    "This route is read-only (a read_only= pattern of the middleware, or @read_only), so "
    "its transactions cannot commit."
)

#: SQLSTATEs after which re-running the whole transaction may succeed: serialization
#: failure and deadlock.
_CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})


class GuardedSession(AsyncSession):
    """``AsyncSession`` that refuses concurrent use by two tasks and use after it ended."""

    # Class-level defaults keep session creation as cheap as AsyncSession's own: the
    # instance attributes only appear once a guarded method runs.
    _asgi_sqla_owner: asyncio.Task[Any] | None = None
    _asgi_sqla_depth: int = 0
    _asgi_sqla_ended: str | None = None
    _asgi_sqla_waiters: list[asyncio.Future[None]] | None = None
    _asgi_sqla_pool_exhausted: bool = False
    #: A statement or commit failed with a serialization failure or deadlock.
    _asgi_sqla_conflict: bool = False
    #: Why this session's transactions must never commit, if they must not.
    _asgi_sqla_rollback_only: str | None = None
    #: on_commit callbacks waiting for the root transaction to commit, and those whose
    #: transaction has committed, waiting to run.
    _asgi_sqla_on_commit: list[Callable[[], object]] | None = None
    _asgi_sqla_committed: list[Callable[[], object]] | None = None


def _guard(name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    unguarded = getattr(AsyncSession, name)

    @functools.wraps(unguarded)
    async def guarded(self: GuardedSession, *args: Any, **kwargs: Any) -> Any:
        if self._asgi_sqla_ended is not None:
            raise SessionEndedError(self._asgi_sqla_ended)
        task = asyncio.current_task()
        owner = self._asgi_sqla_owner
        if owner is None:
            self._asgi_sqla_owner = task
        elif owner is not task:
            raise ConcurrentSessionUseError(
                _CONCURRENT_USE.format(task=_task_name(task), owner=_task_name(owner))
            )
        self._asgi_sqla_depth += 1
        try:
            # super() rather than AsyncSession's function: a session class_ given in
            # session_options keeps its own overrides.
            return await getattr(super(GuardedSession, self), name)(*args, **kwargs)
        except PoolTimeoutError:
            # Remembered so that the response can say 503, whatever the app made of it.
            self._asgi_sqla_pool_exhausted = True
            raise
        except DBAPIError as exc:
            # Remembered so that a retrying route can re-run the request even when the
            # app's framework turned the error into a 500 response.
            if is_conflict(exc):
                self._asgi_sqla_conflict = True
            raise
        finally:
            self._asgi_sqla_depth -= 1
            if not self._asgi_sqla_depth:
                self._asgi_sqla_owner = None
                _wake(self)

    return guarded


def _cleanup(name: str) -> Callable[..., Coroutine[Any, Any, None]]:
    unguarded = getattr(AsyncSession, name)

    @functools.wraps(unguarded)
    async def cleanup(self: GuardedSession) -> None:
        if self._asgi_sqla_ended is None:
            await guarded(self)

    guarded = _guard(name)
    return cleanup


for _name in _GUARDED_METHODS:
    if hasattr(AsyncSession, _name):  # delete_all and merge_all are new in 2.1
        setattr(GuardedSession, _name, _guard(_name))
for _name in _CLEANUP_METHODS:
    setattr(GuardedSession, _name, _cleanup(_name))

_guarded_commit = _guard("commit")


@functools.wraps(AsyncSession.commit)
async def _commit(self: GuardedSession) -> None:
    if self._asgi_sqla_rollback_only is not None:
        raise RollbackOnlyError(self._asgi_sqla_rollback_only)
    await _guarded_commit(self)
    await run_committed_callbacks(self)


GuardedSession.commit = _commit  # type: ignore[method-assign,assignment]


def add_on_commit(session: GuardedSession, callback: Callable[[], object]) -> None:
    """Run ``callback`` once ``session``'s current root transaction has committed.

    SQLAlchemy's ``after_commit`` and ``after_rollback`` session events tell when that
    happens, however the transaction ends (``commit()``, ``async with
    session.begin():``, or the middleware); the callbacks then run, outside the
    transaction, the next time the package's code is back in async code: after an
    explicit ``commit()``, or when the package ends the session.
    """
    pending = session._asgi_sqla_on_commit
    if pending is None:
        pending = session._asgi_sqla_on_commit = []
        sync_session = session.sync_session

        def after_commit(sync: Any) -> None:
            # Releasing a SAVEPOINT fires this event too; only the root commit counts.
            if not sync.in_nested_transaction() and pending:
                committed = session._asgi_sqla_committed
                if committed is None:
                    committed = session._asgi_sqla_committed = []
                committed.extend(pending)
                pending.clear()

        def after_rollback(sync: Any) -> None:
            if not sync.in_nested_transaction():
                pending.clear()

        event.listen(sync_session, "after_commit", after_commit)
        event.listen(sync_session, "after_rollback", after_rollback)
    pending.append(callback)


async def run_committed_callbacks(session: GuardedSession) -> None:
    """Run the on_commit callbacks whose transaction has committed; log their errors."""
    while session._asgi_sqla_committed:
        callback = session._asgi_sqla_committed.pop(0)
        try:
            result = callback()
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception(
                "The on_commit callback %r failed; the transaction had committed.", callback
            )


@functools.cache
def guarded_class(cls: type[AsyncSession]) -> type[GuardedSession]:
    """Return ``cls`` with the guard mixed in (``cls`` itself when it already has it)."""
    if issubclass(cls, GuardedSession):
        return cls
    return type(f"Guarded{cls.__name__}", (GuardedSession, cls), {})


def make_read_only(session: GuardedSession) -> None:
    """Make every transaction of ``session`` read-only and never committed.

    On PostgreSQL and MySQL the transaction is declared ``READ ONLY``, so a write fails
    at once; on every database the package rolls it back instead of committing.
    """
    session._asgi_sqla_rollback_only = READ_ONLY
    bind = session.bind
    if bind is not None and bind.dialect.name in ("postgresql", "mysql"):
        event.listen(session.sync_session, "after_begin", _set_transaction_read_only)


def _set_transaction_read_only(session: Any, transaction: Any, connection: Any) -> None:
    # after_begin runs before the transaction's first statement: the only moment
    # SET TRANSACTION is allowed.
    connection.exec_driver_sql("SET TRANSACTION READ ONLY")


def is_conflict(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an error it came from) is a serialization failure or deadlock."""
    seen = 0
    while exc is not None and seen < 8:  # frameworks may re-wrap; chains are short
        for candidate in (exc, getattr(exc, "orig", None)):
            if getattr(candidate, "sqlstate", None) in _CONFLICT_SQLSTATES:
                return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _unguarded(session: GuardedSession) -> AsyncSession:
    """``session`` seen past the guard, for the package's own cleanup of a retired session."""
    return cast(AsyncSession, super(GuardedSession, session))


def _task_name(task: asyncio.Task[Any] | None) -> str:
    return f"task {task.get_name()!r}" if task is not None else "code outside any task"


def _wake(session: GuardedSession) -> None:
    waiters = session._asgi_sqla_waiters
    if waiters:
        session._asgi_sqla_waiters = None
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


async def _wait_until_idle(session: GuardedSession) -> None:
    # A child task the app did not wait for (asyncio.gather after a sibling failed)
    # may still be inside a statement; closing under it would break its connection.
    while session._asgi_sqla_owner is not None:
        waiter = asyncio.get_running_loop().create_future()
        if session._asgi_sqla_waiters is None:
            session._asgi_sqla_waiters = []
        session._asgi_sqla_waiters.append(waiter)
        await waiter


async def run_to_completion(coro: Awaitable[_T]) -> _T:
    """Run ``coro`` to its end even if the calling task is cancelled meanwhile.

    Cleanup that is abandoned halfway leaves a connection in an unknown state, or
    returns it to the pool after the app has moved on.  The work runs in a task of
    its own that ``asyncio.wait`` does not cancel; a cancellation that arrives
    meanwhile is re-raised once the work has finished, so the caller never returns
    before its cleanup did.  (SQLAlchemy's ``AsyncSession.__aexit__`` shields its
    ``close()`` the same way.)  If the work failed too, the cancellation still wins
    (the caller is being cancelled) and carries the work's error as its cause.
    """
    task = asyncio.ensure_future(coro)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError as exc:
            # anyio delivers a scope's cancellation again on every loop iteration,
            # so this may run many times before the task is done.
            cancelled = exc
    if cancelled is not None:
        error = None if task.cancelled() else task.exception()
        raise cancelled from error
    return task.result()


def retire(session: GuardedSession, reason: str) -> None:
    """Make every later database call on ``session`` raise ``SessionEndedError(reason)``."""
    session._asgi_sqla_ended = reason


async def end_session(session: GuardedSession, *, commit: bool, reason: str) -> None:
    """Commit (or roll back) and close ``session``, returning its connection.

    The session is retired first, so nothing can start on it meanwhile.  The work is
    shielded from cancellation.  A failed commit is rolled back, closed, and then
    re-raised; a failed rollback or close is logged and the connection invalidated,
    never returned to the pool in an unknown state.
    """
    retire(session, reason)
    await run_to_completion(_end(session, commit))


async def _end(session: GuardedSession, commit: bool) -> None:
    await _wait_until_idle(session)
    unguarded = _unguarded(session)
    if commit and session._asgi_sqla_rollback_only is None:
        try:
            await unguarded.commit()
        except BaseException:
            # After a failed COMMIT the connection's state is not known: SQLite keeps
            # the transaction open after a deferred constraint fails, yet SQLAlchemy
            # marks it inactive, so close() would pool it without a ROLLBACK and the
            # next request would inherit the failed writes.  Discard the connection.
            await _invalidate(unguarded)
            raise
    await _close(session)
    await run_committed_callbacks(session)


async def _close(session: GuardedSession) -> None:
    unguarded = _unguarded(session)
    try:
        # close() rolls back whatever transaction is still open.
        await unguarded.close()
    except Exception:
        # The rollback could not run (the connection dropped, or a cancelled statement
        # left the driver mid-protocol): discard the connection instead of pooling it.
        logger.warning(
            "Could not roll back and close a session; invalidating its connection.",
            exc_info=True,
        )
        await _invalidate(unguarded)


async def _invalidate(unguarded: AsyncSession) -> None:
    """Close the session and discard its connection rather than return it to the pool."""
    try:
        await unguarded.invalidate()
    except Exception:
        logger.exception("Could not invalidate a session's connection.")
