"""The session class handed to applications, and how a session is ended.

(This is about a ``Database``'s ``AsyncSession``.  A ``SyncDatabase``'s ``Session`` gets
the same guard, with threads in the place of tasks: see ``_threaded``.)

Sessions made by a ``Database`` are ``AsyncSession`` subclasses (of the ``class_`` given
in ``session_options``, if any) whose *synchronous* session carries a guard.  Every
call that reaches the database passes there, whatever the async class calls it
(SQLModel's ``exec()`` runs the synchronous session directly) and however the app
gets there (``run_sync``, ``begin()`` blocks, lazy loads): a statement passes
``Session._execute_internal``, a connection ``Session._connection_for_bind``, a flush
``Session.flush``, a commit the ``before_commit`` event, and ``rollback``, ``begin``,
``close``, ``reset`` and ``invalidate`` are guarded as they are.  The guard does what
SQLAlchemy cannot do for us:

* It turns concurrent use of one session by two tasks into a clear
  ``ConcurrentSessionUseError`` *before* SQLAlchemy starts the second operation.
  SQLAlchemy's own error for this arrives mid-operation and leaves the session in a
  state its owner can no longer close cleanly.  Each ``AsyncSession`` call runs its
  synchronous code in a greenlet of its own (``greenlet_spawn``): the greenlet that
  last used the session is still alive exactly while that call is under way.
* It retires a session once the package has ended it: any later call that would reach
  the database raises ``SessionEndedError`` before a connection is checked out, so a
  stale reference kept past ``db.release()`` or past the end of the request cannot
  take a connection that nobody will give back.  Calls that only release resources
  (``close()``, ``reset()``, ``invalidate()``) do nothing on a retired session.
* It keeps a rollback-only (or read-only) session from committing, by any API: see
  :func:`make_read_only` for exactly what that covers.
* It remembers that the database was unavailable (a pool timeout, a refusal by its
  ``admission_limit``, a connection lost or refused, a server turned read-only: see
  ``_unavailable``), so that the response can say 503, and a serialization failure or
  deadlock (so that a retrying route can run again), met by a statement, a flush or
  ``commit()``, even when the app's framework turned the error into a 500.  A failure
  to acquire a connection is told apart from the same exception types raised by the
  app's own code.
* It takes the request's place at the database's ``admission_limit`` (``_admission``)
  before the session's first connection.
* It runs a transaction's first statement once more on a new connection when the
  pooled one was dead (a restart, a killed backend, an idle timeout), when nothing of
  the transaction had been answered: see ``_reconnect`` for exactly when.

What it does not cover: in-memory bookkeeping that reaches no database (``add()``,
``expunge()``, the identity-map part of ``get()`` or ``delete()``), and connections the
app takes from the engine itself (``db.engine.connect()``) or statements it sends on
the ``Connection`` a session lent it (``await session.connection()``, including its
``commit()``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Generic, TypeVar, cast, overload

from greenlet import getcurrent  # type: ignore[import-untyped,unused-ignore]
from sqlalchemy import Engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.util.concurrency import in_greenlet

from ._admission import Ticket
from ._autocommit import autocommit_engine, write_refused
from ._errors import (
    BlockingCallError,
    ConcurrentSessionUseError,
    ConfigurationError,
    RollbackOnlyError,
    SessionEndedError,
    exception_chain,
)
from ._log import logger
from ._lost_commits import confirm, probing
from ._reconnect import drop_dead_connection, log_reconnect, taken_for_this_call
from ._unavailable import (
    mysql_error_code,
    note_acquire_failure,
    note_read_only_transaction,
    unavailable,
)

_T = TypeVar("_T")

#: The ``AsyncSession`` coroutine methods that reach the database.  The guard does not
#: rely on this list (it runs on the synchronous session, which every path passes);
#: the pytest plugin takes its turns on the test's connection in them.
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

_CONCURRENT_USE = (
    "{task} used db.session while {owner} was still using it. An AsyncSession is not "
    "safe for concurrent use: give each concurrent task its own session with "
    "`async with db.new_session() as session:`, or make the Database with "
    "session_per_task=True."
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
#: The same on MySQL and MariaDB, by error number (older drivers give no SQLSTATE):
#: ER_LOCK_DEADLOCK (SQLSTATE 40001), after which InnoDB has rolled the whole transaction
#: back ("Deadlocks in InnoDB", MySQL Reference Manual 17.7.5; MariaDB error 1213).
_CONFLICT_MYSQL_ERRORS = frozenset({1213})

#: Seconds between two looks at a call still running on a session the package ends.
_IDLE_CHECK_INTERVAL = 0.05

#: The guard's refusals, raised before a call starts: they change nothing.
_REFUSED = (ConcurrentSessionUseError, SessionEndedError, BlockingCallError)

#: The synchronous session the package is ending in this context: its own calls pass
#: the ended mark (set by ``retire()`` before the package commits or closes).
_ending: ContextVar[Session | None] = ContextVar("_ending", default=None)


class _GuardedSyncSession(Session):
    """The guard, mixed in above the synchronous session class (see the module doc)."""

    #: Why the package ended the session, once it has.
    _asgi_sqla_ended: str | None = None
    #: Why this session's transactions must never commit, if they must not.
    _asgi_sqla_rollback_only: str | None = None
    #: Why a statement, flush or commit failed for want of the database (see
    #: ``_unavailable``); None while none has.
    _asgi_sqla_unavailable: str | None = None
    #: A statement, flush or commit failed with a serialization failure or deadlock.
    _asgi_sqla_conflict: bool = False
    #: The greenlet of the call that last reached the database, and its task (weakly:
    #: a call that has finished keeps neither alive).
    _asgi_sqla_operation: tuple[weakref.ref[Any], weakref.ref[asyncio.Task[Any]] | None] | None
    _asgi_sqla_operation = None
    #: The savepoint whose release a rollback-only session's ``before_commit`` let pass.
    _asgi_sqla_releasing: SessionTransaction | None = None
    #: A statement of the current transaction failed (the app may have caught it): the
    #: commit checks first that the transaction is still alive (see ``_before_commit``).
    _asgi_sqla_statement_failed = False
    #: on_commit callbacks waiting for the current transaction to commit.
    _asgi_sqla_on_commit: list[Callable[[], object]] | None = None
    #: on_commit callbacks whose transaction has committed, waiting to run.
    _asgi_sqla_committed: list[Callable[[], object]] | None = None
    #: The request's place at the database's ``admission_limit``, taken at the first
    #: connection (see ``_admission``); None where nothing is counted.
    _asgi_sqla_ticket: Ticket | None = None
    #: before_commit callbacks of the current transaction (see :func:`add_before_commit`).
    _asgi_sqla_before_commit: list[Callable[[Session], object]] | None = None
    #: A before_commit callback raised: the commit that ran it rolls back (``commit``).
    _asgi_sqla_hook_failed = False
    #: The savepoint that was current when a commit was last announced (see
    #: :func:`_announces_root_commit`).
    _asgi_sqla_announced: SessionTransaction | None = None
    #: The transaction whose first statement ran again on a new connection (``_reconnect``).
    _asgi_sqla_reconnected: SessionTransaction | None = None
    #: Called at each such re-run: counts it in the request's statistics, when kept.
    _asgi_sqla_count_reconnect: Callable[[], None] | None = None
    #: Reads in autocommit (``make_read_only(autocommit=True)``): pending changes are
    #: refused at the flush, before anything is sent.
    _asgi_sqla_autocommit = False

    def _execute_internal(self, *args: Any, **kwargs: Any) -> Any:
        # Every statement: execute(), scalar(s)(), get(), refresh(), lazy loads, exec().
        if self._asgi_sqla_autocommit:
            # SQLAlchemy 2.0 autoflushes only before a statement of ORM entities, 2.1 before
            # every one ("Session autoflush behavior simplified to be unconditional", What's
            # New in 2.1): pending changes meet the refusal before a Core read on 2.0 too,
            # instead of being dropped at the end of a request answered 200.
            self._autoflush()
        first = taken_for_this_call(self._transaction)
        unavailable_before = self._asgi_sqla_unavailable
        try:
            return self._guarded(super()._execute_internal, *args, **kwargs)
        except DBAPIError as exc:
            if not (first and self._reconnected(exc, unavailable_before)):
                self._asgi_sqla_statement_failed = True
                raise
        # The transaction's first statement met a dead pooled connection: once more.
        try:
            return self._guarded(super()._execute_internal, *args, **kwargs)
        except DBAPIError:
            self._asgi_sqla_statement_failed = True
            raise

    def _reconnected(self, exc: DBAPIError, unavailable_before: str | None) -> bool:
        """Whether the failed first statement may run again on a new connection (see
        ``_reconnect``); if so, the dead connection is out and the failure forgotten."""
        transaction = self.get_transaction()
        if transaction is None or transaction is self._asgi_sqla_reconnected:
            return False  # once per transaction
        engine = drop_dead_connection(transaction, exc)
        if engine is None:
            return False
        self._asgi_sqla_reconnected = transaction
        self._asgi_sqla_unavailable = unavailable_before  # the request never sees it
        log_reconnect(engine, exc)
        count = self._asgi_sqla_count_reconnect
        if count is not None:
            count()
        return True

    def _connection_for_bind(self, *args: Any, **kwargs: Any) -> Any:
        acquire = (
            super()._connection_for_bind
            if self._asgi_sqla_ticket is None
            else self._admitted_connection_for_bind
        )
        try:
            return self._guarded(acquire, *args, **kwargs)
        except Exception as exc:
            # Failing to acquire a connection: a refused or timed-out connect counts as
            # the database being unavailable here, and only here (see ``_unavailable``).
            note_acquire_failure(exc)
            _note_failure(self, exc)
            raise

    def _admitted_connection_for_bind(self, *args: Any, **kwargs: Any) -> Any:
        # Past the guard (an ended session is refused first), before the transaction
        # begins: a refusal leaves the session as it was.
        ticket = self._asgi_sqla_ticket
        assert ticket is not None  # only called with one
        ticket.enter()
        return super()._connection_for_bind(*args, **kwargs)

    def flush(self, objects: Any = None) -> None:
        # Guarded before the flush, or an autoflush, changes anything.
        self._guarded(self._checked_flush if self._asgi_sqla_autocommit else super().flush, objects)

    def _checked_flush(self, objects: Any) -> None:
        if self.new or self.deleted or any(self.is_modified(o) for o in self.dirty):
            raise write_refused("flushing the session's pending changes")
        super().flush(objects)

    def _guarded(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``call(*args, **kwargs)`` past the guard, remembering what its failure means."""
        _enter(self)
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            _note_failure(self, exc)
            raise

    def commit(self) -> None:
        self._asgi_sqla_hook_failed = False  # set by a before_commit callback of this commit
        try:
            self._guarded(super().commit)
        except Exception as exc:
            if self._asgi_sqla_hook_failed:
                # A before_commit callback raised inside the transaction, which SQLAlchemy
                # leaves open: its failure is the commit's, so nothing of it may commit.
                self.rollback()
            elif not isinstance(exc, _REFUSED):
                self._forget_transaction()  # it did not commit: its callbacks never run
            # A refusal came before the commit started (another task or thread is inside
            # a call): the transaction is as it was, and its owner may still commit it.
            raise

    def rollback(self) -> None:
        self._guarded(super().rollback)
        self._forget_transaction()

    def begin(self, nested: bool = False) -> SessionTransaction:
        return self._guarded(super().begin, nested)

    def close(self) -> None:
        if _may_release(self):
            self._guarded(super().close)
            self._forget_transaction()

    def reset(self) -> None:
        if _may_release(self):
            self._guarded(super().reset)
            self._forget_transaction()

    def invalidate(self) -> None:
        if _may_release(self):
            self._guarded(super().invalidate)
            self._forget_transaction()

    def _forget_transaction(self) -> None:
        """The current transaction is over without a commit: drop what belonged to it.

        Its on_commit callbacks go with it, even when it had not begun (no statement
        ran, so SQLAlchemy fires no ``after_rollback``), and so does the mark of a
        failed statement.
        """
        self._asgi_sqla_statement_failed = False
        if self._asgi_sqla_on_commit:
            self._asgi_sqla_on_commit.clear()
        if self._asgi_sqla_before_commit:
            self._asgi_sqla_before_commit.clear()


@event.listens_for(_GuardedSyncSession, "before_commit")
def _before_commit(session: _GuardedSyncSession) -> None:
    # Every commit passes here: commit(), the end of a begin() block, run_sync, prepare().
    _enter(session)
    if session._asgi_sqla_statement_failed:
        _check_alive(session)
    reason = session._asgi_sqla_rollback_only
    if reason is None:
        return
    savepoint = session.get_nested_transaction()
    if savepoint is None or session._asgi_sqla_releasing is savepoint:
        raise RollbackOnlyError(reason)
    # Releasing a savepoint commits nothing.  But SQLAlchemy also announces here, while
    # a savepoint left open is still the current transaction, the commit of a begin()
    # block that would release it and commit: the savepoint's own release, announced
    # next, is then seen a second time and refused, before anything is released.
    session._asgi_sqla_releasing = savepoint


def _check_alive(session: _GuardedSyncSession) -> None:
    """Raise if a failed statement the app caught has aborted the transaction.

    PostgreSQL aborts the whole transaction at a failed statement, and then answers its
    COMMIT with a ROLLBACK, without an error: the commit would seem to succeed and the
    response claim writes that were lost.  One statement tells: on an aborted
    transaction it fails ("current transaction is aborted"), and that failure is the
    commit's.  SQLite keeps the transaction, and the statement passes.  Only run after
    a statement failed, so a healthy request pays nothing.
    """
    session.connection().exec_driver_sql("SELECT 1")
    session._asgi_sqla_statement_failed = False


#: The guarded synchronous session class made for each class, made once.
_guarded_sync_classes: dict[type[Session], type[_GuardedSyncSession]] = {}


def _guarded_sync_class(cls: type[Session]) -> type[_GuardedSyncSession]:
    """Return ``cls`` with the guard mixed in (``cls`` itself when it already has it)."""
    if issubclass(cls, _GuardedSyncSession):
        return cls
    guarded = _guarded_sync_classes.get(cls)
    if guarded is None:
        guarded = _guarded_sync_classes[cls] = type(
            f"Guarded{cls.__name__}", (_GuardedSyncSession, cls), {}
        )
    return guarded


def _enter(session: _GuardedSyncSession) -> None:
    """Refuse a call on an ended session, or one that overlaps another call on it."""
    ended = session._asgi_sqla_ended
    if ended is not None:
        if _ending.get() is session:
            return  # the package ending it, once every call of the app's has finished
        raise SessionEndedError(ended)
    current = getcurrent()
    operation = session._asgi_sqla_operation
    if operation is not None:
        running = operation[0]()
        if running is current:
            return
        if running is not None and not running.dead:
            owner = operation[1]() if operation[1] is not None else None
            raise ConcurrentSessionUseError(
                _CONCURRENT_USE.format(task=_task_name(_current_task()), owner=_task_name(owner))
            )
    if in_greenlet():  # an AsyncSession call: its greenlet lives as long as the call
        task = asyncio.current_task()  # greenlet_spawn runs in the event loop's thread
        session._asgi_sqla_operation = (
            weakref.ref(current),
            weakref.ref(task) if task is not None else None,
        )


def _may_release(session: _GuardedSyncSession) -> bool:
    """Whether close(), reset() or invalidate() should run (on a retired session, no)."""
    return session._asgi_sqla_ended is None or _ending.get() is session


def _note_failure(session: _GuardedSyncSession, exc: Exception) -> None:
    reason = unavailable(exc)
    if reason is not None:
        # Remembered so that the response can say 503, whatever the app made of it.
        session._asgi_sqla_unavailable = reason
    elif isinstance(exc, DBAPIError) and is_conflict(exc):
        # Remembered so that a retrying route can re-run the request even when the
        # app's framework turned the error into a 500 response.
        session._asgi_sqla_conflict = True


class _OnSyncSession(Generic[_T]):
    """An attribute of the guard, kept on the synchronous session where the guard runs."""

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._name = name

    @overload
    def __get__(self, session: None, owner: type[Any]) -> _OnSyncSession[_T]: ...
    @overload
    def __get__(self, session: GuardedSession, owner: type[Any]) -> _T: ...
    def __get__(self, session: GuardedSession | None, owner: type[Any]) -> Any:
        if session is None:
            return self
        return getattr(session.sync_session, self._name)

    def __set__(self, session: GuardedSession, value: _T) -> None:
        setattr(session.sync_session, self._name, value)


class GuardedSession(AsyncSession):
    """``AsyncSession`` that refuses concurrent use by two tasks and use after it ended.

    The guard itself is on :attr:`sync_session` (see the module doc); the marks below
    read and write it there.
    """

    _asgi_sqla_ended = _OnSyncSession[str | None]()
    #: Why a statement or commit failed for want of the database, if one did.
    _asgi_sqla_unavailable = _OnSyncSession[str | None]()
    #: A statement or commit failed with a serialization failure or deadlock.
    _asgi_sqla_conflict = _OnSyncSession[bool]()
    #: Why this session's transactions must never commit, if they must not.
    _asgi_sqla_rollback_only = _OnSyncSession[str | None]()

    def __init__(
        self,
        bind: Any = None,
        *,
        binds: Any = None,
        sync_session_class: type[Session] | None = None,
        **kw: Any,
    ) -> None:
        # The class given here (the pytest plugin gives one) or the class's own, SQLModel's
        # Session for SQLModel's AsyncSession: either way, with the guard.
        cls = sync_session_class or self.sync_session_class
        if not issubclass(cls, _GuardedSyncSession):
            cls = _guarded_sync_class(cls)
        super().__init__(bind, binds=binds, sync_session_class=cls, **kw)

    async def commit(self) -> None:
        try:
            await super().commit()
        except DBAPIError:
            # The COMMIT itself failed: the connection's state is not known (SQLite
            # keeps the failed transaction open, with its lock, and the pool would not
            # roll it back).  Discard it, as the package's own end of a session does.
            await run_to_completion(_invalidate(self))
            raise
        await run_committed_callbacks(self)


#: A guarded session: an ``AsyncSession`` or a synchronous ``Session`` (``_threaded``).
SessionLike = GuardedSession | _GuardedSyncSession


def add_on_commit(session: SessionLike, callback: Callable[[], object]) -> None:
    """Run ``callback`` once ``session``'s current root transaction has committed.

    SQLAlchemy's ``after_commit`` and ``after_rollback`` session events tell when that
    happens, however the transaction ends (``commit()``, ``session.begin()`` blocks, or
    the middleware); the callbacks then run, outside the transaction, once the
    package's code has the commit behind it: after an explicit ``commit()``, or when
    the package ends the session.
    """
    sync_session = sync_of(session)
    pending = sync_session._asgi_sqla_on_commit
    if pending is None:
        pending = sync_session._asgi_sqla_on_commit = []

        def after_commit(sync: Any) -> None:
            # Releasing a SAVEPOINT fires this event too; only the root commit counts.
            if not sync.in_nested_transaction() and pending:
                committed = sync_session._asgi_sqla_committed
                if committed is None:
                    committed = sync_session._asgi_sqla_committed = []
                committed.extend(pending)
                pending.clear()

        event.listen(sync_session, "after_commit", after_commit)
        _drop_on_rollback(sync_session, pending)
    pending.append(callback)


def add_before_commit(session: SessionLike, callback: Callable[[Session], object]) -> None:
    """Run ``callback(sync_session)`` inside ``session``'s current root transaction, just
    before it commits; never if it rolls back.

    SQLAlchemy's ``before_commit`` session event runs it, however the transaction is
    committed (``commit()``, the end of a ``session.begin()`` block, ``run_sync``, the
    package's ending, a two-phase ``prepare()``), within the transaction: "the
    Session can emit SQL to the database many times within the scope of a
    transaction" (``SessionEvents.before_commit``).  Pending ORM changes are flushed
    first, so the callback sees the transaction's writes.  Releasing a SAVEPOINT runs
    nothing.  If it raises, the commit fails and the transaction rolls back
    (``_GuardedSyncSession.commit``; a ``begin()`` block rolls back by itself).
    """
    sync_session = sync_of(session)
    pending = sync_session._asgi_sqla_before_commit
    if pending is None:
        pending = sync_session._asgi_sqla_before_commit = []

        def before_commit(sync: Any) -> None:
            # Listened to on the instance, so it runs after the guard's class-level
            # listeners (the checks for concurrent use and rollback-only come first).
            if _announces_root_commit(sync) and pending:
                _run_before_commit(sync, pending)

        event.listen(sync_session, "before_commit", before_commit)
        _drop_on_rollback(sync_session, pending)
    pending.append(callback)


def _drop_on_rollback(sync_session: Session, pending: list[Any]) -> None:
    """Empty ``pending`` (a transaction's callbacks) when its root transaction rolls back."""

    def after_rollback(sync: Any) -> None:
        if not sync.in_nested_transaction():
            pending.clear()

    event.listen(sync_session, "after_rollback", after_rollback)


def _announces_root_commit(session: _GuardedSyncSession) -> bool:
    """Whether this ``before_commit`` announces the commit of the root transaction.

    SQLAlchemy announces a SAVEPOINT's release with the same event.  With a savepoint
    current it may be either: the savepoint's release, or the commit of a ``begin()``
    block that releases the savepoints left open, announced while they are still
    current and followed by the innermost one's own release announcement.  So the
    first announcement with a savepoint current is taken for its release, and a
    second with the same savepoint tells that a root commit came first (as the
    rollback-only check in ``_before_commit`` reasons).
    """
    savepoint = session.get_nested_transaction()
    if savepoint is None:
        return True
    if session._asgi_sqla_announced is savepoint:
        return True
    session._asgi_sqla_announced = savepoint
    return False


_ASYNC_HOOK = (
    "The before_commit callback {callback!r} returned an awaitable: SQLAlchemy's "
    "before_commit event is synchronous, so nothing can await it, and this commit "
    "fails. Pass a plain function taking the synchronous Session; its session.execute() "
    "goes through the async driver, as in run_sync()."
)


def _run_before_commit(
    session: _GuardedSyncSession, pending: list[Callable[[Session], object]]
) -> None:
    """Flush, then run the callbacks in the order they were registered."""
    try:
        if not session._flushing:  # a commit from inside a flush flushes nothing now
            session.flush()
        while pending:
            callback = pending.pop(0)
            result = callback(session)
            if inspect.isawaitable(result):
                close = getattr(result, "close", None)
                if close is not None:
                    close()  # never awaited: no "coroutine was never awaited" warning
                raise ConfigurationError(_ASYNC_HOOK.format(callback=callback))
        if session._asgi_sqla_statement_failed:
            # A callback caught a failed statement: on PostgreSQL the transaction is
            # aborted now, and its COMMIT would be answered with a silent ROLLBACK.
            _check_alive(session)
    except BaseException:
        session._asgi_sqla_hook_failed = True
        pending.clear()
        raise


def count_as_committed(session: SessionLike, due: list[Callable[[], object]]) -> None:
    """Make ``due`` run as a commit's callbacks: the transaction committed, though its
    COMMIT raised (the database confirmed it: ``_lost_commits``)."""
    sync_session = sync_of(session)
    sync_session._asgi_sqla_unavailable = None  # its COMMIT's failure is undone
    committed = sync_session._asgi_sqla_committed
    if committed is None:
        committed = sync_session._asgi_sqla_committed = []
    committed.extend(due)


async def run_committed_callbacks(session: SessionLike) -> None:
    """Run the on_commit callbacks whose transaction has committed; log their errors."""
    committed = sync_of(session)._asgi_sqla_committed
    while committed:
        callback = committed.pop(0)
        try:
            result = callback()
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception(_CALLBACK_FAILED, callback)


def run_committed_callbacks_here(session: _GuardedSyncSession) -> None:
    """Run a synchronous session's committed on_commit callbacks in this thread."""
    committed = session._asgi_sqla_committed
    while committed:
        callback = committed.pop(0)
        try:
            callback()
        except Exception:
            logger.exception(_CALLBACK_FAILED, callback)


_CALLBACK_FAILED = "The on_commit callback %r failed; the transaction had committed."


def sync_of(session: SessionLike) -> _GuardedSyncSession:
    """The synchronous session where ``session``'s guard and marks are kept."""
    if isinstance(session, AsyncSession):
        return cast(_GuardedSyncSession, session.sync_session)
    return session


@functools.cache
def guarded_class(cls: type[AsyncSession]) -> type[GuardedSession]:
    """Return ``cls`` with the guard mixed in (``cls`` itself when it already has it)."""
    if issubclass(cls, GuardedSession):
        return cls
    return type(f"Guarded{cls.__name__}", (GuardedSession, cls), {})


def make_read_only(session: SessionLike, *, autocommit: bool = False) -> None:
    """Make every transaction of ``session`` read-only and never committed.

    On PostgreSQL, MySQL and MariaDB the transaction is declared ``READ ONLY``, so a
    write fails at once.  On every database the session's transactions never commit:
    the package rolls them back, and any commit raises ``RollbackOnlyError`` before
    anything is flushed or committed, by whichever API it comes (``commit()``, the end
    of an ``async with session.begin():`` block, which then rolls back and gives the
    connection back, ``run_sync(lambda s: s.commit())``, ``db.commit()``, or a session
    class's own methods).  Releasing a SAVEPOINT is allowed: it commits nothing.
    ``db.set_rollback_only()`` puts the same mark with its own message.

    It does not cover what does not go through the session's transaction: a
    connection taken from the engine (``db.engine.connect()``), ``db.new_session()``, a
    ``commit()`` on the ``Connection`` that ``session.connection()`` returns, or a
    ``COMMIT`` sent as SQL text; on databases other than PostgreSQL, MySQL and MariaDB,
    writes made through those are not refused either.

    With ``autocommit``, a session bound to an engine runs its statements in
    autocommit instead (``_autocommit``): no ``BEGIN``, no ``COMMIT``, and every
    statement its connection sends that is not a plain read is refused before it is
    sent, as is a flush of pending changes.  A session bound to a connection (a test's,
    through ``asgi_sqla.pytest_plugin``), or of a class with its own ``get_bind()``,
    keeps its read-only transaction.
    """
    session._asgi_sqla_rollback_only = READ_ONLY
    sync_session = sync_of(session)
    bind = sync_session.bind
    # A session class with its own get_bind() may not use the bind: it keeps the
    # read-only transaction, as does a session bound to a connection.
    if autocommit and isinstance(bind, Engine) and type(sync_session).get_bind is Session.get_bind:
        sync_session.bind = autocommit_engine(bind)
        sync_session._asgi_sqla_autocommit = True
    elif bind is not None and bind.dialect.name in _READ_ONLY_DIALECTS:
        event.listen(sync_session, "after_begin", _set_transaction_read_only)


#: Dialects that have ``SET TRANSACTION READ ONLY``.  A ``mariadb+driver://`` URL gets
#: SQLAlchemy's MariaDB dialect, whose name is "mariadb", not "mysql".
_READ_ONLY_DIALECTS = frozenset({"postgresql", "mysql", "mariadb"})


def _set_transaction_read_only(session: Any, transaction: Any, connection: Any) -> None:
    # after_begin runs before the transaction's first statement: the only moment
    # SET TRANSACTION is allowed.  Noted first, so that a 25006 met on this connection
    # is the app's write in a read-only route, not a server turned read-only.
    note_read_only_transaction(connection)
    connection.exec_driver_sql("SET TRANSACTION READ ONLY")


def is_conflict(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an error it came from) is a serialization failure or deadlock."""
    return any(
        # asyncpg and psycopg 3 name the SQLSTATE ``sqlstate``; psycopg 2, ``pgcode``.
        getattr(candidate, "sqlstate", None) in _CONFLICT_SQLSTATES
        or getattr(candidate, "pgcode", None) in _CONFLICT_SQLSTATES
        or mysql_error_code(candidate) in _CONFLICT_MYSQL_ERRORS
        for error in exception_chain(exc)
        for candidate in (error, getattr(error, "orig", None))
    )


def _unguarded(session: GuardedSession) -> AsyncSession:
    """``session`` below ``GuardedSession``, for the package's own ending of it.

    Its calls pass the ended mark only inside :func:`ending_here` for it.
    """
    return cast(AsyncSession, super(GuardedSession, session))


@contextmanager
def ending_here(session: GuardedSession) -> Iterator[None]:
    """Let this context's calls on ``session`` pass the ended mark while the package ends it.

    The mark lives in the context, which greenlet_spawn passes on to the calls'
    greenlets; it is taken back at the end of the block, so that the app's code that
    runs next in the same task (``run_to_completion`` runs the ending there) is refused.
    """
    token = _ending.set(session.sync_session)
    try:
        yield
    finally:
        _ending.reset(token)


def _task_name(task: asyncio.Task[Any] | None) -> str:
    return f"task {task.get_name()!r}" if task is not None else "code outside any task"


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no event loop in this thread
        return None


async def _wait_until_idle(session: GuardedSession) -> None:
    # A child task the app did not wait for (asyncio.gather after a sibling failed)
    # may still be inside a statement; closing under it would break its connection.
    sync_session = cast(_GuardedSyncSession, session.sync_session)
    while (operation := sync_session._asgi_sqla_operation) is not None:
        running = operation[0]()
        task = operation[1]() if operation[1] is not None else None
        if running is None or running.dead or task is None or task.done():
            return
        if task is asyncio.current_task():  # cannot be inside a call while here
            return
        # A greenlet tells nobody when it finishes; its task usually finishes with it.
        await asyncio.wait((task,), timeout=_IDLE_CHECK_INTERVAL)


async def run_to_completion(coro: Awaitable[_T]) -> _T:
    """Run ``coro`` to its end even if the calling task is cancelled meanwhile.

    Cleanup that is abandoned halfway leaves a connection in an unknown state, or
    returns it to the pool after the app has moved on.  The work runs in a task of
    its own that ``asyncio.wait`` does not cancel; a cancellation that arrives
    meanwhile is re-raised once the work has finished, so the caller never returns
    before its cleanup did.  (SQLAlchemy's ``AsyncSession.__aexit__`` shields its
    ``close()`` the same way.)  If the work failed too, the cancellation still wins
    (the caller is being cancelled) and carries the work's error as its cause.

    The task is also out of reach of the caller's anyio cancel scopes, which
    anyio-aware work (a worker thread's hand-over, a framework's ``send``, the app's
    callbacks) consults.  A request's own ending, which awaits only the driver, uses
    :func:`run_driver_to_completion`, without a task.
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


class _Uncancellable(asyncio.Future[Any]):
    """What the task waits on in place of a future of the shielded work: ``cancel()``
    refuses, and the task's wake-up is put on the work's own future."""

    __slots__ = ("_waited",)

    _waited: asyncio.Future[Any]

    def cancel(self, msg: Any = None) -> bool:
        # Task.cancel() then sets _must_cancel, and the task's next step (once the
        # work's future is done) throws CancelledError to its coroutine: to
        # _shielded_steps, which notes it instead of passing it on.
        return False

    def add_done_callback(self, fn: Any, *, context: Any = None) -> None:
        # The task is woken when the work's future is done, in the same loop iteration
        # as without the shield: no hop through this stand-in.
        self._waited.add_done_callback(fn, context=context)


if sys.version_info >= (3, 11):

    def _shielded_steps(
        awaitable: Awaitable[_T], task: asyncio.Task[Any]
    ) -> Generator[Any, None, _T]:
        """Drive ``awaitable`` in ``task`` itself, past any cancellation of ``task``.

        A task awaits a future ``f`` of the work by calling ``f.add_done_callback``, and
        ``Task.cancel()`` cancels the future its task waits on (``_fut_waiter``); only
        when that ``cancel()`` returns False does it set ``_must_cancel`` and throw
        ``CancelledError`` at the task's next step (CPython, Lib/asyncio/tasks.py,
        ``Task.cancel`` and ``Task.__step``; _asynciomodule.c does the same).  So each
        future the work yields is handed to the task behind an :class:`_Uncancellable`:
        the work's futures are never cancelled, and a ``CancelledError`` thrown while
        ``task.cancelling()`` is above its count at the start is the task's own, kept
        to be raised once the work has finished.  Any other exception thrown is the
        work's (its future failed) and goes on to it, as a task would pass it.
        """
        steps = awaitable.__await__()
        cancels = task.cancelling()
        cancelled: BaseException | None = None
        thrown: BaseException | None = None
        while True:
            try:
                yielded = steps.send(None) if thrown is None else steps.throw(thrown)
            except StopIteration as done:
                if cancelled is not None:
                    raise cancelled from None
                return cast(_T, done.value)
            except BaseException as error:
                if cancelled is None:
                    raise
                raise cancelled from error
            thrown = None
            if yielded is not None:  # a future (None: the work yields to the loop once)
                stand_in = _Uncancellable(loop=yielded.get_loop())
                stand_in._waited = yielded
                stand_in._asyncio_future_blocking = True
                yielded = stand_in
            try:
                yield yielded
            except GeneratorExit:
                steps.close()
                raise
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError) and task.cancelling() > cancels:
                    cancelled = exc
                else:
                    thrown = exc

    class _Shielded(Generic[_T]):
        __slots__ = ("_awaitable", "_task")

        def __init__(self, awaitable: Awaitable[_T], task: asyncio.Task[Any]) -> None:
            self._awaitable = awaitable
            self._task = task

        def __await__(self) -> Generator[Any, None, _T]:
            return _shielded_steps(self._awaitable, self._task)

    async def run_driver_to_completion(coro: Awaitable[_T]) -> _T:
        """:func:`run_to_completion` without a task, for work that awaits only the driver.

        The work runs in the calling task, which cannot cancel it (see
        :func:`_shielded_steps`): no task is made, and the loop makes no extra turn
        to start it and to wake its caller, which was most of what ending a
        one-query request cost (``make bench-hotpath``).  A cancellation that arrives
        meanwhile, from ``Task.cancel()`` or an anyio cancel scope (which cancels the
        task), is re-raised once the work has finished, the work's error as its
        cause, as :func:`run_to_completion` does.  Only for work that never consults
        anyio (SQLAlchemy over asyncpg, psycopg or aiosqlite): anyio-aware code would
        wait for the scope's cancellation to reach it, which the shield never lets
        happen.  It runs in the caller's context: a context variable it sets stays
        set (see :func:`ending_here`).
        """
        task = asyncio.current_task()
        if task is None:
            return await run_to_completion(coro)
        return await _Shielded(coro, task)

else:
    # Python 3.10 has no Task.cancelling() to tell the task's cancellation apart.
    run_driver_to_completion = run_to_completion


def retire(session: SessionLike, reason: str) -> None:
    """Make every later database call on ``session`` raise ``SessionEndedError(reason)``.

    Only the package's own calls through ``_unguarded(session)`` pass from then on;
    ``close()``, ``reset()`` and ``invalidate()`` by anyone else do nothing.
    """
    session._asgi_sqla_ended = reason


async def end_session(session: GuardedSession, *, commit: bool, reason: str) -> None:
    """Commit (or roll back) and close ``session``, returning its connection.

    The session is retired first, so nothing can start on it meanwhile.  The work is
    shielded from cancellation.  A failed commit is rolled back, closed, and then
    re-raised; a failed rollback or close is logged and the connection invalidated,
    never returned to the pool in an unknown state.
    """
    retire(session, reason)
    try:
        await run_driver_to_completion(_end(session, commit))
    finally:
        # The app's on_commit callbacks, run to their end too (even when the request
        # was cancelled during the commit); they may be anyio-aware.
        if sync_of(session)._asgi_sqla_committed:
            await run_to_completion(run_committed_callbacks(session))


async def _end(session: GuardedSession, commit: bool) -> None:
    with ending_here(session):
        await _wait_until_idle(session)
        unguarded = _unguarded(session)
        if commit and session._asgi_sqla_rollback_only is None:
            try:
                with probing(sync_of(session)._asgi_sqla_on_commit) as probe:
                    await unguarded.commit()
            except BaseException as exc:
                # After a failed COMMIT the connection's state is not known: SQLite keeps
                # the transaction open after a deferred constraint fails, yet SQLAlchemy
                # marks it inactive, so close() would pool it without a ROLLBACK and the
                # next request would inherit the failed writes.  Discard the connection
                # (before asking about a lost COMMIT: that takes a connection of the pool).
                await _invalidate(unguarded)
                if not await confirm(probe, exc):
                    raise
                count_as_committed(session, probe.due)
        await _close(session)


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
