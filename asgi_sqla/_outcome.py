"""What ending a unit of work did: one result per database, and why.

Ending a connection's transactions (at response start, at a websocket's next
``receive()``, on ``db.release()``, when the request is over) returns one
:class:`Outcome`.  The middleware, the framework adapters, statistics and logging all
read it; nothing works the outcome out again from a status code or a flag.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

__all__ = ["Outcome", "Result"]


class Result(enum.Enum):
    """How one database's transaction ended."""

    #: The transaction committed.
    COMMITTED = "committed"
    #: The transaction was rolled back, as decided (policy, rollback-only, the app failed).
    ROLLED_BACK = "rolled back"
    #: The commit (or the decision to commit) failed; nothing of it was saved.
    FAILED = "failed"
    #: It committed, but another database of the same request failed afterwards: the
    #: request's writes are only partly saved (logged at ERROR).
    COMMITTED_WHILE_ANOTHER_FAILED = "committed while another failed"


@dataclass(frozen=True)
class Outcome:
    """The end of one unit of work: each database's :class:`Result` and the reason.

    ``results`` and ``reasons`` are keyed by ``Database``, in the order the databases
    ended (the order the request first used them).  ``error`` is the first failure,
    if any: a failed commit, or an exception raised by a ``commit_on`` policy.
    """

    results: Mapping[Hashable, Result] = field(default_factory=dict)
    reasons: Mapping[Hashable, str] = field(default_factory=dict)
    error: BaseException | None = None

    @property
    def failed(self) -> bool:
        """True when a commit failed: the response must not claim success."""
        return self.error is not None

    @property
    def committed(self) -> bool:
        """True when at least one database committed (in full or alone)."""
        return any(
            result in (Result.COMMITTED, Result.COMMITTED_WHILE_ANOTHER_FAILED)
            for result in self.results.values()
        )

    @property
    def all_committed(self) -> bool:
        """True when nothing was rolled back or failed (vacuously true when empty)."""
        return all(result is Result.COMMITTED for result in self.results.values())


#: The outcome of ending a unit of work that had no session open.
NOTHING_ENDED = Outcome()
