"""One connection's unit of work: its lazy sessions, the state machine that ends them.

The middleware makes one :class:`SessionContext` per HTTP request or websocket (and
``db.scope()`` makes one for scripts), puts it in the ASGI scope under ``SCOPE_KEY``
and sets it once in a contextvar.  Sessions are added to it lazily, wherever
``db.session`` is first read.  Child tasks, code below ``BaseHTTPMiddleware`` and
framework handler tasks copy the context and so share the unit, which is why every
session they open is ended with the rest.

The lifecycle is a small state machine (h11's ``_state.py`` style): the states are
:class:`State` members, the events :class:`Event` members, and ``_TRANSITIONS`` is
the whole table.  Anything not in it raises ``_IllegalTransitionError``, naming the
state and the event; asking for a session where none may open raises
``SessionEndedError`` with the reason.

======================  ===========  ======================  =========================
state                   event        next state              when
======================  ===========  ======================  =========================
OPEN                    SESSION      OPEN                    ``db.session`` first read
OPEN                    END_ROUND    ENDING_ROUND            response start, websocket
                                                             ``receive()``, Quart hooks
OPEN                    CLOSE        CLOSING                 the app returned or raised
ENDING_ROUND            SESSION      ENDING_ROUND            a session for the next round
ENDING_ROUND            DONE         OPEN                    this round's sessions ended
CLOSING                 DONE         CLOSED                  sessions ended; no more
CLOSED                  CLOSE        CLOSED                  ending twice ends nothing
======================  ===========  ======================  =========================

A round's ending takes the sessions open when it starts; a session opened meanwhile (a
websocket's sender task, a background task, an ``on_commit`` callback) belongs to the
next round and is ended with it, or at the close.  While CLOSING, and once CLOSED, no
session opens: asking raises ``SessionEndedError``, never gives a session nobody would
end.  Two tasks may end the unit at once (a websocket's receiver waits in
``receive()`` while its sender closes): the second waits until the first ending is
DONE, then ends what is open by then.  Ending returns one :class:`Outcome`, kept as
:attr:`SessionContext.outcome`.

The middleware's units count against their databases' ``admission_limit``
(``_admission``): a round's sessions of one database share one ticket, taken with the
round's sessions for an ending and given back once they have ended.

With ``Database(session_per_task=True)`` a unit keeps several sessions of one database:
the first task to open one (the request's, usually) owns the session kept under the
``Database``; any other task's is kept under a :class:`TaskSessionKey`, which refers to
the task weakly.  They end with the round like several databases' sessions, a
database's newest first (``_ending_order``), so the owner's commits last.

A ``SyncDatabase``'s sessions are asked for in worker threads, possibly several at once
and while the event loop's thread ends the unit: adding a session and taking a round's
sessions for an ending are done under one lock, so every session lands in a round that
some ending takes.  Its sessions end with the others, in the package's threads
(``_threaded``), or in the calling thread when the ending is driven there without an
event loop (:func:`run_here`: ``db.scope()``, ``db.release()`` in a worker thread).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from ._admission import Admission, Ticket
from ._ending import end_sessions
from ._errors import AsgiSqlaError, NoSessionContextError, SessionEndedError
from ._outcome import NOTHING_ENDED, Outcome, Result, SingletonEnum
from ._replicas import ReadRoute, ReplicaSet
from ._session import GuardedSession, make_read_only, sync_of
from ._stats import Limits, RequestStats
from ._stats import Outcome as StatsOutcome
from ._threaded import AnySession
from .types import Scope

__all__ = [
    "SCOPE_KEY",
    "Event",
    "SessionContext",
    "State",
    "TaskSessionKey",
    "current_context",
    "run_here",
]

_T = TypeVar("_T")

#: Held while a unit's sessions are added or taken for an ending (see ``session()``).
_sessions_lock = threading.Lock()

SCOPE_KEY = "asgi_sqla.context"
"""Key of the ``SessionContext`` in the ASGI scope of every HTTP and websocket
connection that passes through ``SQLAlchemyMiddleware``.
"""

current_context: ContextVar[SessionContext | None] = ContextVar("current_context", default=None)

_NO_CONTEXT = (
    "db.session was read outside a request, websocket or db.scope(). Wrap the ASGI app in "
    "SQLAlchemyMiddleware(app, db), or use `async with db.scope():` in scripts, workers, "
    "tests and startup code."
)
_NOT_IN_SCOPE = (
    "This ASGI scope has no asgi_sqla session context (scope[{key!r}] is missing). Is the "
    "app wrapped in SQLAlchemyMiddleware, and is this an 'http' or 'websocket' scope?"
)
_NOT_MANAGED = (
    "{db!r} is not managed here. Pass every database to the middleware: "
    "SQLAlchemyMiddleware(app, {names}), or use `async with db.scope():` for it."
)
_BEING_CLOSED = (
    "db.session was read while the request's last transaction was being committed or "
    "rolled back, after the app had returned, when no session can open (a background "
    "task or an on_commit callback?). Use `async with db.new_session() as session:` "
    "for work that runs then."
)

#: Why a context or its sessions ended; shown by ``SessionEndedError``.
REQUEST_FINISHED = (
    "The request has finished, so db.session can no longer open a session for it (is "
    "this a task that outlived the request?). Use `async with db.scope():` or "
    "`async with db.new_session() as session:` for work that runs after the request."
)
RESPONSE_STARTED = (
    "This session ended when the response started: its transaction was committed or "
    "rolled back then. Read db.session again for a new session."
)
RECEIVE_WAITED = (
    "This session ended when the websocket app waited for the next message. Read "
    "db.session again after each receive() for a new session."
)
RELEASED = "This session was ended by db.release(). Read db.session again for a new session."
_NOTHING_TO_COMMIT = (
    "db.commit() or db.release() was called after the request had finished, or while its "
    "last transaction was ending: what was written through db.session was committed or "
    "rolled back with the request, and this call cannot commit it (is this a thread or "
    "task that outlived the request?). Use `with db.new_session() as session:` "
    "(`async with` for a Database) for work that runs after the request."
)
SCOPE_EXITED = "The db.scope() block that owned this session has exited."


class _IllegalTransitionError(AsgiSqlaError, RuntimeError):
    """An event the unit of work's state does not allow: a bug, never the app's doing."""


class State(SingletonEnum):
    """Where a unit of work is in its life."""

    OPEN = "open"
    ENDING_ROUND = "ending a transaction"
    CLOSING = "closing"
    CLOSED = "closed"


class Event(SingletonEnum):
    """What can happen to a unit of work."""

    SESSION = "a session is opened"
    END_ROUND = "the current transactions end"
    CLOSE = "the connection's work is over"
    DONE = "the ending finished"


# Module-level aliases for the hot path: an Enum member looked up on its class costs
# more than the rest of a request's bookkeeping.
_OPEN = State.OPEN
_ENDING_ROUND = State.ENDING_ROUND
_CLOSING = State.CLOSING
_CLOSED = State.CLOSED
_SESSION = Event.SESSION

_TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (State.OPEN, Event.SESSION): State.OPEN,
    (State.OPEN, Event.END_ROUND): State.ENDING_ROUND,
    (State.OPEN, Event.CLOSE): State.CLOSING,
    (State.ENDING_ROUND, Event.SESSION): State.ENDING_ROUND,
    (State.ENDING_ROUND, Event.DONE): State.OPEN,
    (State.CLOSING, Event.DONE): State.CLOSED,
    (State.CLOSED, Event.CLOSE): State.CLOSED,
}


class ManagedDatabase(Hashable, Protocol):
    """What the unit of work needs of a ``Database`` (defined above this module)."""

    _replicas: ReplicaSet | None
    _stats: bool
    _admission: Admission | None
    _session_per_task: bool

    @property
    def engine(self) -> AsyncEngine | Engine: ...

    @property
    def replica_engines(self) -> tuple[AsyncEngine, ...]: ...

    @property
    def commit_on(self) -> Callable[[int], bool] | None: ...

    @property
    def limits(self) -> Limits: ...

    def _make_session(self, **options: Any) -> AnySession: ...

    def _make_replica_session(self, engine: AsyncEngine) -> GuardedSession | None: ...

    def _can_prepare(self) -> bool: ...


class TaskSessionKey:
    """Names the session a child task has of its own (``Database(session_per_task=True)``).

    The key of that session in the unit of work, and so in :attr:`Outcome.results`,
    beside the databases' own sessions: ``key.db`` is the ``Database``, ``key.task_name``
    the task's name.  It refers to the task weakly, so a finished task is freed; a new
    task never matches the key of a finished one, even at the same address.
    """

    __slots__ = ("_hash", "_task", "db", "task_name")

    def __init__(self, db: ManagedDatabase, task: asyncio.Task[Any]) -> None:
        self.db = db
        self.task_name = task.get_name()
        self._task = weakref.ref(task)
        self._hash = hash((db, id(task)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        # Two references to one live task are equal; a dead one only to itself.
        return (
            isinstance(other, TaskSessionKey) and other.db is self.db and other._task == self._task
        )

    def __repr__(self) -> str:
        return f"{self.db!r} in task {self.task_name!r}"


def _database_of(key: Hashable) -> ManagedDatabase:
    """The database whose session is kept under ``key`` (the database, or a task's key)."""
    if type(key) is TaskSessionKey:
        return key.db
    return cast(ManagedDatabase, key)


def _ending_order(sessions: Mapping[Hashable, AnySession]) -> dict[Hashable, AnySession]:
    """``sessions`` in the order they end when child tasks have sessions of their own.

    The databases end in the order the request first used them, as always; a
    database's sessions end newest first, so the request's own session (the first)
    ends last and commits only if every child's did.  Newest first is also the order a
    test's connection needs (``asgi_sqla.pytest_plugin``), where each session is a
    savepoint opened inside the ones before it.
    """
    by_database: dict[Hashable, list[Hashable]] = {}
    for key in sessions:
        by_database.setdefault(_database_of(key), []).append(key)
    return {key: sessions[key] for keys in by_database.values() for key in reversed(keys)}


def _current_task() -> asyncio.Task[Any] | None:
    if asyncio._get_running_loop() is None:  # a thread of the app: no task
        return None
    return asyncio.current_task()


class SessionContext:
    """One connection's unit of work (HTTP request, websocket, or ``db.scope()``).

    Reach it with ``SessionContext.from_scope(scope)`` where only the ASGI scope
    (a framework's ``request.scope``) is at hand, and ``bind()`` it where the
    context was not copied, so that ``db.session`` works there too.
    """

    # Class-level defaults, not __slots__: one is made for every request, and most
    # requests change none of these, so __init__ sets only what every unit needs.
    _ended: str | None = None  # why no session may open again, once CLOSED
    _written: set[Hashable] | None = None  # wrote to these: read them there
    _stats: dict[ManagedDatabase, RequestStats] | None = None  # only when tracked
    #: This round's places at the databases' ``admission_limit``, when counted.
    _tickets: dict[ManagedDatabase, Ticket] | None = None
    counted = False
    """Counts against the databases' ``admission_limit``: set on the middleware's units
    (requests, websocket rounds), never on scripts' and workers' (``_admission``).
    """
    read_only = False
    """Sessions opened from now on are read-only (a ``read_only`` route)."""
    autocommit = False
    """Read-only sessions opened from now on run each statement in autocommit (an
    ``autocommit_reads`` route, ``@read_only(autocommit=True)``).
    """
    manual = False
    """Nothing commits automatically (a ``manual_commit`` route)."""
    commit: bool | None = None
    """A block's own commit policy (``db.scope(commit=...)``): True commits on success
    whatever ``commit_on`` says, False always rolls back; None: ``commit_on`` decides.
    """
    session_options: Mapping[str, Any] | None = None
    """Sessionmaker keywords for this unit's sessions (``db.scope(**options)``)."""
    two_phase = False
    """Commit several databases with two-phase commit."""
    committed_any = False
    """Something of this unit's work was committed (an ending, or a session's commit
    when the middleware has ``retry`` routes): the request must not be re-run.
    """
    committed_all = True
    """Every ending so far committed everything it ended (nothing rolled back or failed)."""
    outcome: Outcome | None = None
    """The outcome of the last ending; None before the first."""
    _after_close: list[Callable[[], object]] | None = None
    _ending_done: asyncio.Event | None = None  # for tasks waiting to end the unit too
    #: The task whose sessions are kept under their database (``session_per_task``): the
    #: first task to open one in this unit.  Other tasks' are under a TaskSessionKey.
    _owner: weakref.ref[asyncio.Task[Any]] | None = None
    #: A session under a TaskSessionKey was opened here (see ``_ending_order``).
    _task_sessions = False
    ends_on_receive = True
    """A websocket's transactions end when the app waits in ``receive()``.  An adapter
    whose framework reads messages ahead (Quart) turns this off and ends them where
    the handler waits instead.
    """
    threaded = True
    """Sessions may be added from worker threads (a ``SyncDatabase``'s): closing an
    unused unit then holds ``_sessions_lock``.  The middleware turns it off when
    every database is async: their sessions open only on the event loop's thread
    (``Database.session`` needs a running loop, and an ``AsyncEngine`` serves one
    loop), and taking the lock is most of what :meth:`close_unused` costs.
    """

    def __init__(self, databases: tuple[ManagedDatabase, ...]) -> None:
        self._databases = databases
        # Primary sessions under their Database, read sessions under its ReplicaSlot.
        self._sessions: dict[Hashable, AnySession] = {}
        self._state = _OPEN

    @classmethod
    def from_scope(cls, scope: Scope) -> SessionContext:
        """Return the context the middleware stored in ``scope``."""
        context = scope.get(SCOPE_KEY)
        if not isinstance(context, SessionContext):
            raise NoSessionContextError(_NOT_IN_SCOPE.format(key=SCOPE_KEY))
        return context

    @classmethod
    def current(cls) -> SessionContext:
        """Return the context of the running request, websocket or ``db.scope()``."""
        context = current_context.get()
        if context is None:
            raise NoSessionContextError(_NO_CONTEXT)
        return context

    @contextmanager
    def bind(self) -> Iterator[SessionContext]:
        """Make this the current context for the duration of the ``with`` block."""
        token = current_context.set(self)
        try:
            yield self
        finally:
            current_context.reset(token)

    @property
    def state(self) -> State:
        """The unit of work's state (see the module's table)."""
        return self._state

    @property
    def ended(self) -> bool:
        """True once the request (or scope) is over and no new session can open."""
        return self._state is _CLOSED

    @property
    def has_sessions(self) -> bool:
        """True when at least one session is open in this context."""
        return bool(self._sessions)

    def _transition(self, event: Event) -> None:
        state = _TRANSITIONS.get((self._state, event))
        if state is None:
            raise _IllegalTransitionError(
                f"A unit of work that is {self._state.value} cannot take the event "
                f"{event.value!r}; this is a bug in asgi_sqla or an adapter: please report it."
            )
        self._state = state

    def _check_open(self, db: ManagedDatabase) -> None:
        state = self._state
        if (state, _SESSION) not in _TRANSITIONS:  # CLOSING or CLOSED: see the table
            raise SessionEndedError(
                (self._ended or REQUEST_FINISHED) if state is _CLOSED else _BEING_CLOSED
            )
        if db not in self._databases:
            names = ", ".join(repr(d) for d in (*self._databases, db))
            raise NoSessionContextError(_NOT_MANAGED.format(db=db, names=names))

    def _key(self, db: ManagedDatabase) -> Hashable:
        """Where the current task's session of ``db`` is kept: under ``db``, or, for a
        ``session_per_task`` database in a task other than the owner, a task's key."""
        if db._session_per_task:
            owner = self._owner
            task = _current_task()
            if owner is not None and task is not None and owner() is not task:
                return TaskSessionKey(db, task)
        return db

    def session(self, db: ManagedDatabase) -> AnySession:
        """Return ``db``'s session in this context, creating it on first use."""
        key = self._key(db) if db._session_per_task else db
        session = self._sessions.get(key)
        if session is not None:
            return session
        self._check_open(db)
        options = self.session_options
        # A read in autocommit prepares nothing, and psycopg refuses tpc_begin() then.
        # Nor does a read-only transaction, which never commits; and MySQL refuses its
        # SET TRANSACTION READ ONLY once XA BEGIN has begun the transaction (error 1568).
        if self.two_phase and not (self.autocommit or self.read_only):
            session = db._make_session(twophase=True)
        elif options is not None:
            session = db._make_session(**options)
        else:
            session = db._make_session()
        if self.read_only:
            make_read_only(session, autocommit=self.autocommit)
        if key is not db:
            self._task_sessions = True
        elif db._session_per_task and self._owner is None:
            task = _current_task()  # the first task to open a session here owns ``db``
            if task is not None:
                self._owner = weakref.ref(task)
        with _sessions_lock:
            # A SyncDatabase's session may be asked for by several threads at once, or
            # while the event loop's thread ends the unit: check and add in one step,
            # so that no session lands where no ending will find it.
            self._check_open(db)
            added = self._sessions.setdefault(key, session)
            if added is session and db._admission is not None and self.counted:
                sync_of(session)._asgi_sqla_ticket = self._ticket(db, db._admission)
            return added

    def read_session(self, db: ManagedDatabase) -> AnySession:
        """``db``'s read session: on a replica, or the primary session (``_replicas``)."""
        replicas = db._replicas
        written = self._written
        if replicas is None or (written is not None and db in written):
            return self.session(db)
        if db._session_per_task and self._key(db) is not db:
            return self.session(db)  # a child task's reads go to its own session
        session = self._sessions.get(replicas.slot)
        if session is not None:
            return session
        self._check_open(db)
        engine = replicas.pick(db.replica_engines)
        if engine is None:  # every replica is down: read on the primary
            return self.session(db)
        session = db._make_replica_session(engine)
        if session is None:  # the sessions' factory keeps reads on the primary
            return self.session(db)
        # Replicas are an async Database's: its sessions are GuardedSessions.
        primary = cast(Callable[[bool], GuardedSession | None], self._primary_for(db))
        ReadRoute(session, replicas, db.replica_engines, primary)
        if db._admission is not None and self.counted:  # one place with the primary's
            sync_of(session)._asgi_sqla_ticket = self._ticket(db, db._admission)
        self._sessions[replicas.slot] = session
        return session

    def _ticket(self, db: ManagedDatabase, admission: Admission) -> Ticket:
        """This round's ticket at ``db``, shared by its sessions.

        Called under ``_sessions_lock``, or on the event loop's thread (read sessions
        are an async ``Database``'s), so that it is taken with the round's sessions.
        """
        tickets = self._tickets
        if tickets is None:
            tickets = self._tickets = {}
        ticket = tickets.get(db)
        if ticket is None:
            ticket = tickets[db] = admission.ticket()
        return ticket

    def _primary_for(self, db: ManagedDatabase) -> Callable[[bool], AnySession | None]:
        def primary(force: bool) -> AnySession | None:
            # The primary session when the statement needs it (``force``) or once the
            # request has written there; None: the replica serves it.
            written = self._written
            if force or (written is not None and db in written):
                return self.session(db)
            return None

        return primary

    def note_write(self, db: Hashable) -> None:
        """Reads of ``db`` go to its primary from now on (read-your-writes)."""
        written = self._written
        if written is None:
            self._written = {db}
        else:
            written.add(db)

    def stats(self, db: ManagedDatabase) -> RequestStats:
        """``db``'s statistics for this context, created on first use."""
        all_stats = self._stats
        if all_stats is None:
            all_stats = self._stats = {}
        stats = all_stats.get(db)
        if stats is None:
            stats = all_stats[db] = RequestStats()
        return stats

    def all_stats(self) -> Mapping[ManagedDatabase, RequestStats]:
        """The statistics of every database this context tracked."""
        return self._stats or {}

    def existing(self, db: ManagedDatabase) -> AnySession | None:
        """Return ``db``'s session (this task's) if one is open in this context."""
        return self._sessions.get(self._key(db))

    def committable(self, db: ManagedDatabase) -> AnySession | None:
        """``db``'s open session, for ``db.commit()``; None when there is nothing to commit.

        Raises ``SessionEndedError`` once the unit is closing or closed: the caller's
        writes were ended with the request, and returning would claim a commit that
        this call did not make.
        """
        session = self._sessions.get(self._key(db))
        if session is None:
            self._refuse_commit_once_closing()
        return session

    def _refuse_commit_once_closing(self) -> None:
        state = self._state
        if state is _CLOSING or state is _CLOSED:
            raise SessionEndedError(_NOTHING_TO_COMMIT)

    @property
    def unavailable(self) -> str | None:
        """Why an open session found the database unavailable (``_unavailable``), if one did."""
        for session in self._sessions.values():
            reason = session._asgi_sqla_unavailable
            if reason is not None:
                return reason
        return None

    @property
    def conflicted(self) -> bool:
        """True when an open session hit a serialization failure or a deadlock."""
        return any(s._asgi_sqla_conflict for s in self._sessions.values())

    def decide(self, status: int | None, *, failed: bool = False) -> Decider:
        """The rule that ends this unit's transactions for ``status`` (None: success)."""
        return Decider(status, failed=failed, manual=self.manual, commit=self.commit)

    async def end(
        self, status: int | None = None, *, reason: str, failed: bool = False, here: bool = False
    ) -> Outcome:
        """End this round's sessions and return the outcome; the unit stays open.

        ``status`` is what each database's ``commit_on`` decides on (None: success
        without a status); ``failed`` rolls everything back.  A cancellation that
        arrives meanwhile is re-raised once every session has ended.  ``here``: driven
        without an event loop by :func:`run_here` (a ``SyncDatabase``'s sessions).
        """
        if self._state is not _OPEN:
            await self._after_ending()
        with _sessions_lock:
            self._transition(Event.END_ROUND)
            sessions, self._sessions = self._sessions, {}
            tickets, self._tickets = self._tickets, None
        decider = self.decide(status, failed=failed)
        return await self._end_sessions(sessions, decider, reason, here, tickets)

    async def close(
        self, status: int | None = None, *, reason: str, failed: bool = False, here: bool = False
    ) -> Outcome:
        """End every open session and refuse new ones from now on; return the outcome."""
        await self._after_ending()
        with _sessions_lock:
            if self._state is _CLOSED:
                return NOTHING_ENDED
            self._ended = reason
            self._transition(Event.CLOSE)
            sessions, self._sessions = self._sessions, {}
            tickets, self._tickets = self._tickets, None
        decider = self.decide(status, failed=failed)
        return await self._end_sessions(sessions, decider, reason, here, tickets)

    @asynccontextmanager
    async def closing(self, reason: str) -> AsyncIterator[None]:
        """Close at the end of the block: commit on success, roll back if it raises.

        A failed commit is raised from the block, as ``db.scope()`` promises.
        """
        try:
            yield
        except BaseException:
            await self.close(reason=reason, failed=True)
            raise
        outcome = await self.close(reason=reason)
        if outcome.error is not None:
            raise outcome.error

    @contextmanager
    def closing_here(self, reason: str) -> Iterator[None]:
        """:meth:`closing` for a unit of ``SyncDatabase`` sessions, ended in this thread."""
        try:
            yield
        except BaseException:
            run_here(self.close(reason=reason, failed=True, here=True))
            raise
        outcome = run_here(self.close(reason=reason, here=True))
        if outcome.error is not None:
            raise outcome.error

    def would_commit(self, status: int) -> bool:
        """Whether a response with ``status`` lets every database commit by its policy.

        For adapters deciding about work that follows a commit when no session was
        open to end; a database whose ``commit_on`` is None commits only by hand and
        holds nothing back.
        """
        try:
            return all(db.commit_on is None or db.commit_on(status) for db in self._databases)
        except Exception:  # a broken policy commits nothing (see ``_ending``)
            return False

    def close_unused(self, reason: str) -> bool:
        """Close a unit that has no session open, without awaiting (most requests end so).

        Returns False, changing nothing, when the unit is open with sessions (a thread
        of the app opened one after the app returned): :meth:`close` must end them.
        """
        if self._state is not _OPEN:
            return True
        if self.threaded:
            with _sessions_lock:
                if self._sessions:
                    return False
                self._close_empty(reason)
        elif self._sessions:
            return False
        else:
            self._close_empty(reason)
        if self._after_close is not None:
            self._run_after_close()
        return True

    def _close_empty(self, reason: str) -> None:
        # OPEN -CLOSE-> CLOSING -DONE-> CLOSED in one step: there is nothing to end,
        # and this runs at the end of every request.
        self._ended = reason
        self._state = _CLOSED

    async def release(self, db: ManagedDatabase, *, commit: bool, here: bool = False) -> Outcome:
        """End ``db``'s sessions now, if it has any; a later read opens a new one.

        Only these sessions end, so the unit stays as it is (sessions of other
        databases, and new ones, are unaffected).  Returns their outcome.
        """
        sessions: dict[Hashable, AnySession] = {}
        replicas = db._replicas
        own = self._key(db)
        with _sessions_lock:
            for key in (own,) if replicas is None or own is not db else (replicas.slot, db):
                session = self._sessions.pop(key, None)
                if session is not None:
                    sessions[key] = session
            tickets = self._tickets
            ticket = None
            # The place is the round's, shared by all of ``db``'s sessions: a child task's
            # release (``session_per_task``) keeps it while another session may hold a
            # connection under it.
            slot = replicas.slot if replicas is not None else None
            if tickets is not None and not any(
                key is slot or _database_of(key) is db for key in self._sessions
            ):
                ticket = tickets.pop(db, None)
        if not sessions:
            if commit:
                self._refuse_commit_once_closing()
            return NOTHING_ENDED
        decider = Decider(None, failed=False, manual=False, release=commit)
        try:
            outcome, cancelled = await end_sessions(
                sessions, decider, reason=RELEASED, engine_of=_engine_of, here=here
            )
        finally:
            if ticket is not None:
                ticket.leave()
        return self._record(outcome, cancelled)

    async def _after_ending(self) -> None:
        """Wait while another task is ending this unit (see the module doc)."""
        while self._state is _ENDING_ROUND or self._state is _CLOSING:
            done = self._ending_done
            if done is None:
                done = self._ending_done = asyncio.Event()
            await done.wait()

    async def _end_sessions(
        self,
        sessions: dict[Hashable, AnySession],
        decider: Decider,
        reason: str,
        here: bool,
        tickets: Mapping[ManagedDatabase, Ticket] | None,
    ) -> Outcome:
        """End ``sessions``, then give their places back (``tickets``) and end the round."""
        try:
            if not sessions:
                return self._record(NOTHING_ENDED, None)
            two_phase = self.two_phase and all(db._can_prepare() for db in self._databases)
            outcome, cancelled = await end_sessions(
                _ending_order(sessions) if self._task_sessions else sessions,
                decider,
                reason=reason,
                two_phase=two_phase,
                engine_of=_engine_of,
                here=here,
            )
            return self._record(outcome, cancelled)
        finally:
            if tickets is not None:  # the sessions have ended: their connections are back
                for ticket in tickets.values():
                    ticket.leave()
            self._transition(Event.DONE)
            done, self._ending_done = self._ending_done, None
            if done is not None:
                done.set()
            if self._state is _CLOSED and self._after_close is not None:
                self._run_after_close()

    def after_close(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once this unit is closed (at once if it is already).

        For adapters that act on the whole connection's outcome (Quart's held
        background tasks): work opened after the response started commits only when
        the unit closes, after the app has returned.
        """
        if self._state is _CLOSED:
            callback()
            return
        if self._after_close is None:
            self._after_close = []
        self._after_close.append(callback)

    def _run_after_close(self) -> None:
        callbacks, self._after_close = self._after_close or [], None
        for callback in callbacks:
            callback()

    def _record(self, outcome: Outcome, cancelled: BaseException | None) -> Outcome:
        """Keep ``outcome`` for every reader; feed statistics; re-raise a cancellation."""
        self.outcome = outcome
        if outcome.committed:
            self.committed_any = True
        if not outcome.all_committed:
            self.committed_all = False
        all_stats = self._stats
        if all_stats is not None:
            # A database's statistics cover its sessions in every task: the worst
            # result of this ending is theirs.
            ended: dict[ManagedDatabase, Result] = {}
            for key, result in outcome.results.items():
                db = _database_of(key)
                if _SEVERITY[result] >= _SEVERITY[ended.get(db, Result.COMMITTED)]:
                    ended[db] = result
            for db, result in ended.items():
                stats = all_stats.get(db)
                if stats is not None:
                    stats.outcome = _STATS_OUTCOME[result]
        if cancelled is not None:
            raise cancelled from outcome.error  # the cause tells whether it all ended as decided
        return outcome


_SEVERITY = {
    Result.COMMITTED: 0,
    Result.COMMITTED_WHILE_ANOTHER_FAILED: 1,
    Result.ROLLED_BACK: 2,
    Result.FAILED: 3,
}
_STATS_OUTCOME: dict[Result, StatsOutcome] = {
    Result.COMMITTED: "committed",
    Result.COMMITTED_WHILE_ANOTHER_FAILED: "committed",
    Result.ROLLED_BACK: "rolled back",
    Result.FAILED: "commit failed",
}


class Decider:
    """Decides, per database, whether an ending commits, and says why.

    The order of the rules is the order of precedence: the app failed; the session is
    read-only or rollback-only; ``db.release(commit=...)`` said; the route commits by
    hand; the block's own ``commit`` policy said; the database never commits
    automatically; its ``commit_on`` policy for the status.
    """

    __slots__ = ("commit", "failed", "manual", "release", "status")

    def __init__(
        self,
        status: int | None,
        *,
        failed: bool,
        manual: bool,
        release: bool | None = None,
        commit: bool | None = None,
    ) -> None:
        self.status = status
        self.failed = failed
        self.manual = manual
        self.release = release  # db.release(commit=...): the app decided
        self.commit = commit  # db.scope(commit=...): the block's policy

    def __call__(self, key: Hashable, session: AnySession) -> tuple[bool, str]:
        if self.failed:
            return False, "rolled back: the request failed or was cut short"
        marked = session._asgi_sqla_rollback_only
        if marked is not None:
            return False, "rolled back: " + marked
        if self.release is not None:
            if self.release:
                return True, "committed: db.release()"
            return False, "rolled back: db.release(commit=False)"
        if self.manual:
            return False, "rolled back: a manual_commit route commits only by hand"
        if self.commit is not None:
            if self.commit:
                return True, "committed: the block's commit=True"
            return False, "rolled back: the block's commit=False"
        commit_on = _database_of(key).commit_on
        if commit_on is None:
            return False, "rolled back: commit_on is None"
        status = self.status
        if status is None:
            return True, "committed: success"
        if commit_on(status):
            return True, f"committed: status {status}"
        return False, f"rolled back: status {status}"


def _engine_of(key: Hashable) -> AsyncEngine:
    engine = _database_of(key).engine
    assert isinstance(engine, AsyncEngine)  # two-phase commit: async databases only
    return engine


def run_here(ending: Coroutine[Any, Any, _T]) -> _T:
    """Run ``ending`` (an ending with ``here=True``) to its end in this thread.

    A ``SyncDatabase``'s sessions end with ``here=True`` without ever suspending, so
    the coroutine completes at its first step, with no event loop: ``db.scope()`` in a
    script, ``db.release()`` in a worker thread.
    """
    try:
        ending.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    ending.close()
    raise _IllegalTransitionError(
        "An ending driven in this thread had to wait (another task was ending the same "
        "unit of work); this is a bug in asgi_sqla: please report it."
    )
