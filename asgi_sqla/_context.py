"""The per-connection holder of sessions, and how code finds it.

The middleware makes one ``SessionContext`` per HTTP request or websocket, puts it in
the ASGI scope under ``SCOPE_KEY`` and sets it once in a contextvar.  The holder is
mutable: sessions are added to it lazily, wherever ``db.session`` is first read.
Child tasks, code below ``BaseHTTPMiddleware`` and framework handler tasks copy the
context and so share the holder, which is why the middleware sees and ends every
session they open.  A request that never reads ``db.session`` costs one small object.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

from ._errors import NoSessionContextError, SessionEndedError
from ._multidb import (
    Written,
    commit_prepared_again,
    end_read_sessions,
    log_partial_commit,
    prepare_writers,
)
from ._replicas import ReplicaSlot, end_read_session
from ._session import GuardedSession, end_session, make_read_only
from ._stats import RequestStats
from .types import Scope

if TYPE_CHECKING:
    from ._database import Database

__all__ = ["SCOPE_KEY", "SessionContext"]

logger = logging.getLogger("asgi_sqla")

#: Key of the ``SessionContext`` in the ASGI scope of every HTTP and websocket
#: connection that passes through ``SQLAlchemyMiddleware``.
SCOPE_KEY = "asgi_sqla.context"

_current_context: ContextVar[SessionContext | None] = ContextVar("_current_context", default=None)

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
SCOPE_EXITED = "The db.scope() block that owned this session has exited."


class SessionContext:
    """The sessions of one connection (HTTP request or websocket) or ``db.scope()``.

    Reach it with ``SessionContext.from_scope(scope)`` where only the ASGI scope
    (a framework's ``request.scope``) is at hand, and ``bind()`` it where the
    context was not copied, so that ``db.session`` works there too.
    """

    __slots__ = (
        "_databases",
        "_ended",
        "_manual",
        "_read_only",
        "_sessions",
        "_stats",
        "_two_phase",
        "_written",
    )

    def __init__(self, databases: tuple[Database, ...]) -> None:
        self._databases = databases
        # Primary sessions under their Database, read sessions under its ReplicaSlot.
        self._sessions: dict[Database | ReplicaSlot, GuardedSession] = {}
        self._two_phase = False  # set by SQLAlchemyMiddleware(..., two_phase=True)
        self._written: set[Database] | None = None  # wrote to these: read them there
        self._ended: str | None = None
        self._read_only = False  # sessions opened from now on are read-only
        self._manual = False  # nothing commits automatically
        self._stats: dict[Database, RequestStats] | None = None  # only when tracked

    @classmethod
    def from_scope(cls, scope: Scope) -> SessionContext:
        """Return the context the middleware stored in ``scope``."""
        try:
            context = scope[SCOPE_KEY]
        except KeyError:
            raise NoSessionContextError(_NOT_IN_SCOPE.format(key=SCOPE_KEY)) from None
        if not isinstance(context, SessionContext):
            raise NoSessionContextError(_NOT_IN_SCOPE.format(key=SCOPE_KEY))
        return context

    @classmethod
    def current(cls) -> SessionContext:
        """Return the context of the running request, websocket or ``db.scope()``."""
        context = _current_context.get()
        if context is None:
            raise NoSessionContextError(_NO_CONTEXT)
        return context

    @contextmanager
    def bind(self) -> Iterator[SessionContext]:
        """Make this the current context for the duration of the ``with`` block."""
        token = _current_context.set(self)
        try:
            yield self
        finally:
            _current_context.reset(token)

    @property
    def ended(self) -> bool:
        """True once the request (or scope) is over and no new session can open."""
        return self._ended is not None

    def session(self, db: Database) -> GuardedSession:
        """Return ``db``'s session in this context, creating it on first use."""
        session = self._sessions.get(db)
        if session is not None:
            return session
        if self._ended is not None:
            raise SessionEndedError(self._ended)
        if db not in self._databases:
            names = ", ".join(repr(d) for d in (*self._databases, db))
            raise NoSessionContextError(_NOT_MANAGED.format(db=db, names=names))
        if self._two_phase:
            session = self._sessions[db] = db._make_session(twophase=True)
        else:
            session = self._sessions[db] = db._make_session()
        if self._read_only:
            make_read_only(session)
        return session

    def stats(self, db: Database) -> RequestStats:
        """``db``'s statistics for this context, created on first use."""
        all_stats = self._stats
        if all_stats is None:
            all_stats = self._stats = {}
        stats = all_stats.get(db)
        if stats is None:
            stats = all_stats[db] = RequestStats()
        return stats

    def existing(self, db: Database) -> GuardedSession | None:
        """Return ``db``'s session if one is open in this context."""
        return self._sessions.get(db)

    @property
    def has_sessions(self) -> bool:
        """True when at least one session is open in this context."""
        return bool(self._sessions)

    @property
    def pool_exhausted(self) -> bool:
        """True when an open session failed to get a connection: the pool timed out."""
        return any(s._asgi_sqla_pool_exhausted for s in self._sessions.values())

    @property
    def conflicted(self) -> bool:
        """True when an open session hit a serialization failure or a deadlock."""
        return any(s._asgi_sqla_conflict for s in self._sessions.values())

    async def release(self, db: Database, *, commit: bool) -> None:
        """End ``db``'s session now, if there is one; a later read opens a new one."""
        replicas = db._replicas
        if replicas is not None:
            read = self._sessions.pop(replicas.slot, None)
            if read is not None:
                await end_read_session(read, RELEASED)
        session = self._sessions.pop(db, None)
        if session is not None:
            session.sync_session.twophase = False  # one database: a one-phase commit
            await self._end_session(db, session, commit, RELEASED)

    async def finish(self, status: int | None, *, reason: str, failed: bool = False) -> None:
        """End every open session: commit where its database's policy allows, else roll back.

        ``status`` is the HTTP status the outcome depends on (None: success without
        one); ``failed`` rolls everything back.  Read sessions are closed first.  The
        databases then end in the order the request first used them.  Every session is
        closed even when a commit fails; the first error is raised afterwards, and
        later databases are then rolled back rather than committed, and an ERROR log
        names the databases that committed and those that did not.  With two-phase
        commit, the writers are prepared first, then all committed (see ``_multidb``).
        A cancellation meanwhile changes no decision: it is re-raised at the end.
        """
        all_sessions = self._sessions
        if not all_sessions:
            return
        self._sessions = {}
        sessions, cancelled = await end_read_sessions(all_sessions, reason)
        automatic = not (failed or self._manual)
        error: BaseException | None = None
        failed_db: Database | None = None
        prepared: dict[Database, Written] = {}
        if self._two_phase:
            # Prepares when two databases or more wrote; otherwise only turns the
            # sessions' twophase flag off, for a plain one-phase commit.  A test's
            # transaction (asgi_sqla.pytest_plugin) cannot be prepared: one phase.
            can_prepare = automatic and all(db._bound_maker is None for db in sessions)
            two_phase = await prepare_writers(
                sessions, lambda d: can_prepare and d._wants_commit(status), reason
            )
            prepared, error, failed_db = two_phase.prepared, two_phase.error, two_phase.failed
            cancelled = cancelled or two_phase.cancelled
        prepare_failed = error is not None
        committed: list[Database] = []
        not_committed: list[Database] = []
        for db, session in sessions.items():
            if db in prepared:  # all writers prepared: the decision is to commit them all
                commit = not prepare_failed
            else:
                commit = automatic and error is None and db._wants_commit(status)
            commit = commit and session._asgi_sqla_rollback_only is None
            try:
                await self._end_session(db, session, commit, reason)
            except asyncio.CancelledError as exc:  # the end had finished (run_to_completion)
                cancelled = exc
                if exc.__cause__ is not None:  # ... and failed: it did not commit
                    if error is None:
                        error, failed_db = exc.__cause__, db
                    elif db is not failed_db:
                        not_committed.append(db)
                    continue
            except BaseException as exc:  # collected, then re-raised below
                prepared_commit = commit and db in prepared and isinstance(exc, Exception)
                if prepared_commit and await commit_prepared_again(db, prepared[db]):
                    committed.append(db)
                    continue
                if error is None:
                    error, failed_db = exc, db
                elif db is not failed_db:
                    not_committed.append(db)
                continue
            if db is not failed_db:
                (committed if commit else not_committed).append(db)
        several = len(sessions) > 1
        if several and isinstance(error, Exception) and failed_db is not None:
            log_partial_commit(failed_db, committed, not_committed)
        if cancelled is not None:
            raise cancelled from error  # the cause tells whether it all ended as decided
        if error is not None:
            raise error

    async def _end_session(
        self, db: Database, session: GuardedSession, commit: bool, reason: str
    ) -> None:
        """End one session, recording the outcome when ``db`` tracks statistics."""
        if not db._stats:
            await end_session(session, commit=commit, reason=reason)
            return
        commit = commit and session._asgi_sqla_rollback_only is None
        stats = self.stats(db)
        try:
            await end_session(session, commit=commit, reason=reason)
        except BaseException:
            stats.outcome = "commit failed" if commit else "rolled back"
            raise
        stats.outcome = "committed" if commit else "rolled back"

    def end(self, reason: str) -> None:
        """Refuse new sessions from now on; ``reason`` says why, in the error."""
        self._ended = reason
