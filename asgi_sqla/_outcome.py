"""What ending a unit of work did: one result per database, and why.

Ending a connection's transactions (at response start, at a websocket's next
``receive()``, on ``db.release()``, when the request is over) returns one
:class:`Outcome`.  The middleware, the framework adapters, statistics and logging all
read it; nothing works the outcome out again from a status code or a flag.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Mapping

__all__ = ["Outcome", "Result", "SingletonEnum"]


class SingletonEnum(enum.Enum):
    """An ``Enum`` whose members hash by identity, in C.

    Members are singletons, so identity is their equality; ``Enum``'s own ``__hash__``
    runs Python code, and the package looks these up (transition tables, sets) on
    every request that ends a transaction.
    """

    __hash__ = object.__hash__


class Result(SingletonEnum):
    """How one database's transaction ended."""

    COMMITTED = "committed"
    """The transaction committed."""
    ROLLED_BACK = "rolled back"
    """The transaction was rolled back, as decided (policy, rollback-only, app failure)."""
    FAILED = "failed"
    """The commit (or the decision to commit) failed; nothing of it was saved."""
    COMMITTED_WHILE_ANOTHER_FAILED = "committed while another failed"
    """It committed, but another database of the same request failed afterwards: the
    request's writes are only partly saved (logged at ERROR).
    """


class Outcome:
    """The end of one unit of work: each database's :class:`Result` and the reason.

    ``results`` and ``reasons`` are keyed by ``Database``, in the order the databases
    ended (the order the request first used them).  ``error`` is the first failure,
    if any: a failed commit, or an exception raised by a ``commit_on`` policy.  Read
    it, do not change it: every reader of the ending sees this one value.
    """

    # Not a dataclass: one is made at every ending, and its summary flags are read
    # right away, so they are worked out once here.
    __slots__ = ("all_committed", "committed", "error", "reasons", "results")

    def __init__(
        self,
        results: Mapping[Hashable, Result] | None = None,
        reasons: Mapping[Hashable, str] | None = None,
        error: BaseException | None = None,
    ) -> None:
        self.results: Mapping[Hashable, Result] = results if results is not None else {}
        self.reasons: Mapping[Hashable, str] = reasons if reasons is not None else {}
        self.error = error
        kinds = set(self.results.values())
        #: At least one database committed (in full, or alone).
        self.committed = bool(kinds & _COMMITTED)
        #: Nothing was rolled back or failed (vacuously true when nothing ended).
        self.all_committed = kinds <= {Result.COMMITTED}

    @property
    def failed(self) -> bool:
        """True when a commit failed: the response must not claim success."""
        return self.error is not None

    def __repr__(self) -> str:
        results = ", ".join(f"{db!r}: {result.value}" for db, result in self.results.items())
        return f"Outcome({{{results}}}, error={self.error!r})"


_COMMITTED = frozenset({Result.COMMITTED, Result.COMMITTED_WHILE_ANOTHER_FAILED})


NOTHING_ENDED = Outcome()
"""The outcome of ending a unit of work that had no session open."""
