"""Ending a unit of work's sessions: decide, prepare, commit or roll back, release.

One call ends a set of sessions and returns the :class:`Outcome`.  The steps, in order:

1. Read sessions (on replicas) are closed; they never commit.
2. The decision: for each database, commit or roll back, and why.  A ``commit_on``
   policy that raises is a failure like a failed commit: everything rolls back.
3. With two-phase commit, the writers are prepared (see ``_multidb``).
4. Each session is committed or rolled back and closed, in the order the request
   first used the databases; after a failure the ones left roll back.  Every session
   is closed and its connection returned (or invalidated), whatever happens.

A cancellation that arrives meanwhile changes no decision: each step runs to
completion (``run_to_completion``) and the cancellation is handed back to the caller
to re-raise once everything has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Mapping
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncEngine

from ._log import logger
from ._multidb import commit_prepared_again, end_read_sessions, log_partial_commit, prepare_writers
from ._outcome import Outcome, Result
from ._session import GuardedSession, end_session, sync_of
from ._threaded import AnySession, end_thread_session

__all__ = ["Decision", "end_sessions"]


#: ``decide(db, session)``: commit or not, and why.  May raise (a ``commit_on`` policy).
Decision = Callable[[Any, AnySession], tuple[bool, str]]

_POLICY_RAISED = (
    "The commit_on policy of %r raised %s for this request, so its transaction was rolled "
    "back and the response is an error. Make commit_on return a bool for every status."
)


class _Ending:
    """The state of one ending: the results so far, the first error, a cancellation."""

    __slots__ = (
        "cancelled",
        "error",
        "failed_db",
        "here",
        "prepared",
        "reason",
        "reasons",
        "results",
    )

    def __init__(self, reason: str, here: bool) -> None:
        self.reason = reason
        self.here = here  # driven synchronously: a SyncDatabase's sessions end in this thread
        self.results: dict[Hashable, Result] = {}
        self.reasons: dict[Hashable, str] = {}
        self.error: BaseException | None = None
        self.failed_db: Hashable | None = None
        self.cancelled: BaseException | None = None
        self.prepared: dict[Any, Any] = {}

    def decide(self, sessions: Mapping[Any, AnySession], decide: Decision) -> dict[Any, bool]:
        decisions: dict[Any, bool] = {}
        for db, session in sessions.items():
            try:
                decisions[db], self.reasons[db] = decide(db, session)
            except Exception as exc:  # the app's commit_on: nothing may commit now
                logger.error(_POLICY_RAISED, db, type(exc).__name__, exc_info=True)
                self._fail(db, exc, f"commit_on raised {type(exc).__name__}")
                decisions[db] = False
        return decisions

    async def prepare(
        self, sessions: Mapping[Any, AnySession], decisions: Mapping[Any, bool]
    ) -> None:
        # Two-phase commit is for async databases (the middleware refuses a SyncDatabase).
        writers = cast(Mapping[Any, GuardedSession], sessions)
        two_phase = await prepare_writers(writers, decisions.__getitem__, self.reason)
        self.prepared = two_phase.prepared
        if two_phase.cancelled is not None:
            self.cancelled = two_phase.cancelled
        if two_phase.error is not None:
            self._fail(two_phase.failed, two_phase.error, "failed to prepare")

    async def end_each(
        self,
        sessions: Mapping[Any, AnySession],
        decisions: Mapping[Any, bool],
        engine_of: Callable[[Any], AsyncEngine],
    ) -> None:
        prepare_failed = self.prepared and self.error is not None
        for db, session in sessions.items():
            if db in self.prepared:  # all writers prepared: the decision is to commit all
                commit = not prepare_failed
            else:
                commit = decisions[db] and self.error is None
            try:
                if isinstance(session, GuardedSession):
                    await end_session(session, commit=commit, reason=self.reason)
                else:
                    await end_thread_session(
                        session, commit=commit, reason=self.reason, here=self.here
                    )
            except asyncio.CancelledError as exc:  # the end had finished (run_to_completion)
                self.cancelled = exc
                if exc.__cause__ is not None:  # ... and failed: it did not commit
                    self._fail(db, exc.__cause__, "commit failed")
                    continue
            except BaseException as exc:
                written = self.prepared.get(db) if commit else None
                if written is not None and await commit_prepared_again(db, engine_of(db), written):
                    self._done(db, commit=True)
                else:
                    self._fail(db, exc, "commit failed")
                continue
            self._done(db, commit)

    def _done(self, db: Hashable, commit: bool) -> None:
        if self.results.get(db) is Result.FAILED:
            return
        if commit:
            self.results[db] = Result.COMMITTED
        else:
            self.results[db] = Result.ROLLED_BACK
            if self.error is not None and db not in self.reasons:
                self.reasons[db] = "another database failed first"

    def _fail(self, db: Hashable, exc: BaseException, why: str) -> None:
        if self.error is None:
            self.error, self.failed_db = exc, db
        self.results[db] = Result.FAILED
        self.reasons[db] = why

    def outcome(self) -> Outcome:
        error, results = self.error, self.results
        if error is not None and len(results) > 1:
            committed = [db for db, r in results.items() if r is Result.COMMITTED]
            rolled_back = [db for db, r in results.items() if r is Result.ROLLED_BACK]
            for db in committed:
                results[db] = Result.COMMITTED_WHILE_ANOTHER_FAILED
            if isinstance(error, Exception):
                log_partial_commit(self.failed_db, committed, rolled_back)
        return Outcome(results, self.reasons, error)


async def end_sessions(
    sessions: Mapping[Any, AnySession],
    decide: Decision,
    *,
    reason: str,
    two_phase: bool = False,
    engine_of: Callable[[Any], AsyncEngine],
    here: bool = False,
) -> tuple[Outcome, BaseException | None]:
    """End ``sessions`` (see the module doc); return the outcome and any cancellation.

    ``sessions`` maps each ``Database`` (and each read session's slot) to its session,
    in first-use order.  ``reason`` is what a later use of one of them is told.
    ``here``: the caller drives the ending without an event loop (``SyncDatabase``),
    so its sessions end in this thread.
    """
    ending = _Ending(reason, here)
    primaries, ending.cancelled = await end_read_sessions(sessions, reason)
    decisions = ending.decide(primaries, decide)
    if two_phase and ending.error is None:
        await ending.prepare(primaries, decisions)
    else:
        for session in primaries.values():
            sync_of(session).twophase = False  # one database: a one-phase commit
    await ending.end_each(primaries, decisions, engine_of)
    return ending.outcome(), ending.cancelled
