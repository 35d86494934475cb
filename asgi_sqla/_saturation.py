"""The saturation warning: a pool that stays (nearly) full, once per episode.

``Database(url, warn_pool_saturated_for=30)`` logs one WARNING when at least
``pool_saturated_share`` of the pool's connections (``pool_size + max_overflow``) have
been checked out for 30 s, with the figures, and an INFO when that episode ends.

No thread or timer watches the pool: the state is re-evaluated at the pool's own
``checkout`` and ``checkin`` events (SQLAlchemy ``PoolEvents``), which a saturated
pool fires at every request it serves.  So the WARNING comes with the first checkout
or checkin once the episode has lasted the configured time; in a pool where nothing
moves at all for longer (every connection held by a stuck request), it comes with the
first connection given back, saying how long the pool was full.

A saturated pool under load dips below the share between a checkin and the next
checkout (the connection goes from one request to the next waiting one): an episode
ends only once the share has stayed below for ``_GRACE_SHARE`` of the configured time
(at most ``_GRACE_MAX`` seconds), noticed at the next event; the INFO says when it ended.
"""

from __future__ import annotations

import logging
import math
import threading
from time import monotonic
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.pool import Pool, QueuePool

from ._errors import ConfigurationError
from ._log import logger

__all__ = ["pool_capacity", "watch_saturation"]

#: A dip below the share shorter than this part of ``warn_pool_saturated_for`` (and
#: than ``_GRACE_MAX`` seconds) does not end an episode.
_GRACE_SHARE = 0.1
_GRACE_MAX = 1.0

_SATURATED = (
    "The connection pool of %r has been saturated for %.1f s: %d of its %d connections "
    "checked out (pool_size=%d, max_overflow=%d; warned at %g%% for %g s). Requests wait "
    "for a connection, up to pool_timeout=%g s, then get 503. Shorten what holds a "
    "connection (warn_held_over finds it), raise pool_size or max_overflow if the "
    "database can take more connections, or shed the excess at once with admission_limit."
)
_ENDED = (
    "The connection pool of %r is no longer saturated: the episode lasted %.1f s (at "
    "most %d connections checked out)."
)
_UNBOUNDED = (
    "warn_pool_saturated_for needs a pool of fixed size (a QueuePool with max_overflow >= 0 "
    "and pool_size > 0), and {db!r} has {pool}: there is no capacity to be saturated. "
    "Remove warn_pool_saturated_for, or pass pool_size and max_overflow (and no "
    "poolclass)."
)


def pool_capacity(db: object, pool: Pool) -> tuple[int, int]:
    """``(pool_size, max_overflow)`` of ``pool``, or ``ConfigurationError`` if unbounded."""
    if isinstance(pool, QueuePool):
        size, overflow = pool.size(), pool._max_overflow
        if size > 0 and overflow >= 0:
            return size, overflow
        shown = f"a QueuePool with pool_size={size}, max_overflow={overflow}"
    else:
        shown = f"a {type(pool).__name__}"
    raise ConfigurationError(_UNBOUNDED.format(db=db, pool=shown))


def watch_saturation(db: object, sync_engine: Engine, share: float, after: float) -> None:
    """Log saturation episodes of ``sync_engine``'s pool (see the module doc)."""
    size, overflow = pool_capacity(db, sync_engine.pool)
    watch = _Watch(db, sync_engine, size, overflow, share, after)
    event.listen(sync_engine, "checkout", watch.checkout)
    event.listen(sync_engine, "checkin", watch.checkin)


#: A log record to emit once the lock is released: level, message, arguments.
_Record = tuple[int, str, tuple[Any, ...]]


class _Watch:
    """The episode state of one pool, updated at each of its checkouts and checkins."""

    def __init__(
        self, db: object, engine: Engine, size: int, overflow: int, share: float, after: float
    ) -> None:
        self._db = db
        self._engine = engine
        self._size = size
        self._overflow = overflow
        self._capacity = size + overflow
        self._share = share
        # The smallest count that is saturated (a float product like 0.9 * 10 may land
        # a hair above the whole number it means).
        self._threshold = max(1, math.ceil(share * self._capacity - 1e-9))
        self._after = after
        self._grace = min(after * _GRACE_SHARE, _GRACE_MAX)
        self._lock = threading.Lock()  # a SyncDatabase's events come from many threads
        self._since: float | None = None  # when the episode began; None: none under way
        self._below_since: float | None = None  # the share dropped below, at this time
        self._peak = 0
        self._warned = False

    def checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        # Fired once the connection is counted as checked out.
        self._moved(self._engine.pool.checkedout())  # type: ignore[attr-defined]

    def checkin(self, dbapi_connection: Any, record: Any) -> None:
        # Fired before the connection is back in the pool: it still counts.
        self._moved(self._engine.pool.checkedout() - 1)  # type: ignore[attr-defined]

    def _moved(self, out: int) -> None:
        now = monotonic()
        with self._lock:
            records = self._update(out, now)
        for level, message, args in records:
            logger.log(level, message, *args, extra={"database": repr(self._db)})

    def _update(self, out: int, now: float) -> list[_Record]:
        """Under the lock: the new state for ``out`` checked out; the records to log."""
        records: list[_Record] = []
        since, below = self._since, self._below_since
        if since is not None and below is not None and now - below >= self._grace:
            # The dip lasted: the episode ended when the dip began.
            self._check_duration(below, records)
            if self._warned:
                records.append((logging.INFO, _ENDED, (self._db, below - since, self._peak)))
            since = self._since = self._below_since = None
            self._warned = False
        if out >= self._threshold:
            self._below_since = None
            if since is None:
                self._since = now
                self._peak = out
            self._peak = max(self._peak, out)
            self._check_duration(now, records)
        elif since is not None and below is None:
            self._below_since = now
            self._check_duration(now, records)
        return records

    def _check_duration(self, until: float, records: list[_Record]) -> None:
        """Under the lock: warn once the episode has lasted until ``until``."""
        since = self._since
        if since is None or self._warned or until - since < self._after:
            return
        self._warned = True
        pool: Any = self._engine.pool
        figures = (
            self._db,
            until - since,
            self._peak,
            self._capacity,
            self._size,
            self._overflow,
            self._share * 100,
            self._after,
            pool.timeout(),
        )
        records.append((logging.WARNING, _SATURATED, figures))
