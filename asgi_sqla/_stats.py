"""What a request did to the database: statements, time, connection hold, outcome.

Off by default.  When a ``Database`` tracks statistics, SQLAlchemy engine and pool
events count each statement and time each connection checkout; the numbers go to the
``SessionContext`` of the request the event runs in (SQLAlchemy runs its sync code in
the calling task's context, so the contextvar is there).  With tracking off, no event
is registered and the request path only checks one attribute for ``None``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Literal

from sqlalchemy import Engine, event

from ._log import logger, printable
from .types import Scope

__all__ = ["PoolStatus", "RequestStats"]


Outcome = Literal["none", "committed", "rolled back", "commit failed"]

_STARTED = "asgi_sqla.statement_started"
_CHECKED_OUT = "asgi_sqla.checked_out"


@dataclass
class RequestStats:
    """One database's share of one request (or websocket, or ``db.scope()``)."""

    #: Statements sent to the database, failed ones included.
    statements: int = 0
    #: Seconds spent waiting for those statements.
    duration: float = 0.0
    #: Seconds a connection was checked out from the pool for this request.
    held: float = 0.0
    #: How the last transaction ended: committed, rolled back or failed to commit.
    outcome: Outcome = "none"


@dataclass(frozen=True)
class PoolStatus:
    """A snapshot of a connection pool, for health endpoints and metrics."""

    #: Connections the pool keeps (``pool_size``).
    size: int
    #: Connections currently checked out by requests.
    checked_out: int
    #: Connections idle in the pool.
    checked_in: int
    #: Connections open beyond ``size`` (negative while the pool is still filling).
    overflow: int


def instrument(sync_engine: Engine, current: Callable[[], RequestStats | None]) -> None:
    """Register the events that feed the ``RequestStats`` that ``current()`` returns.

    ``sync_engine`` is the engine (of an ``AsyncEngine``, its ``sync_engine``);
    ``current()`` gives the running request's statistics for this engine's database,
    or None outside a request.
    """
    events = _Events(current)
    event.listen(sync_engine, "before_cursor_execute", events.before_cursor_execute)
    event.listen(sync_engine, "after_cursor_execute", events.after_cursor_execute)
    event.listen(sync_engine, "handle_error", events.handle_error)
    event.listen(sync_engine.pool, "checkout", events.checkout)
    event.listen(sync_engine.pool, "checkin", events.checkin)


class _Events:
    """The engine and pool event handlers of one instrumented engine."""

    __slots__ = ("current",)

    def __init__(self, current: Callable[[], RequestStats | None]) -> None:
        self.current = current

    def before_cursor_execute(self, conn: Any, *args: Any) -> None:
        conn.info[_STARTED] = perf_counter()

    def after_cursor_execute(self, conn: Any, *args: Any) -> None:
        self._count(conn.info.pop(_STARTED, None))

    def handle_error(self, exception_context: Any) -> None:
        connection = exception_context.connection
        if connection is not None:
            self._count(connection.info.pop(_STARTED, None))

    def _count(self, started: float | None) -> None:
        stats = self.current() if started is not None else None
        if stats is not None and started is not None:
            stats.statements += 1
            stats.duration += perf_counter() - started

    def checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        stats = self.current()
        if stats is not None:
            record.info[_CHECKED_OUT] = (perf_counter(), stats)

    def checkin(self, dbapi_connection: Any, record: Any) -> None:
        checked_out = record.info.pop(_CHECKED_OUT, None) if record is not None else None
        if checked_out is not None:
            started, stats = checked_out
            stats.held += perf_counter() - started


def pool_status(sync_engine: Engine) -> PoolStatus:
    pool: Any = sync_engine.pool
    size = int(pool.size()) if hasattr(pool, "size") else 0
    checked_out = int(pool.checkedout()) if hasattr(pool, "checkedout") else 0
    checked_in = int(pool.checkedin()) if hasattr(pool, "checkedin") else 0
    overflow = int(pool.overflow()) if hasattr(pool, "overflow") else 0
    return PoolStatus(size, checked_out, checked_in, overflow)


def server_timing(all_stats: Iterable[RequestStats]) -> tuple[bytes, bytes] | None:
    """A ``Server-Timing`` header with the request's database time so far."""
    all_stats = list(all_stats)
    if not all_stats:
        return None
    duration = sum(s.duration for s in all_stats) * 1000
    statements = sum(s.statements for s in all_stats)
    noun = "query" if statements == 1 else "queries"
    value = f'db;dur={duration:.1f};desc="{statements} {noun}"'
    return (b"server-timing", value.encode())


@dataclass(frozen=True)
class Limits:
    """A database's warning thresholds (``Database(warn_held_over=..., ...)``)."""

    held: float | None
    statements: float | None


_HELD_TOO_LONG = (
    "%s %s held a connection of %r for %.3f s (more than %.3f s). A handler that reads "
    "a slow request body after its first query holds the connection meanwhile: read "
    "the body first."
)
_TOO_MANY = "%s %s sent %d statements to %r (more than %d): an N+1 query pattern?"
_SUMMARY = "%s %s: %d statements, %.1f ms in %r, connection held %.1f ms, %s."


def report(scope: Scope, all_stats: Iterable[tuple[Any, Limits, RequestStats]]) -> None:
    """Log what the request did: warnings past a database's thresholds, and a DEBUG record.

    ``all_stats`` gives each database, its limits and its statistics.  The records
    carry the route, the method and the figures as ``extra`` fields for structured
    logging; never statements or their parameters.  Paths are escaped: a newline
    decoded from ``%0A`` cannot forge a log line.
    """
    route = _route(scope)
    method = printable(str(scope.get("method", "WEBSOCKET")))
    for db, limits, stats in all_stats:
        _report_one(method, route, db, limits, stats)


def _report_one(method: str, route: str, db: Any, limits: Limits, stats: RequestStats) -> None:
    fields = {
        "route": route,
        "method": method,
        "database": repr(db),
        "statements": stats.statements,
        "db_seconds": round(stats.duration, 6),
        "held_seconds": round(stats.held, 6),
        "outcome": stats.outcome,
    }
    if limits.held is not None and stats.held > limits.held:
        logger.warning(_HELD_TOO_LONG, method, route, db, stats.held, limits.held, extra=fields)
    if limits.statements is not None and stats.statements > limits.statements:
        logger.warning(
            _TOO_MANY, method, route, stats.statements, db, limits.statements, extra=fields
        )
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            _SUMMARY,
            method,
            route,
            stats.statements,
            stats.duration * 1000,
            db,
            stats.held * 1000,
            stats.outcome,
            extra=fields,
        )


def _route(scope: Scope) -> str:
    # Starlette and FastAPI put the matched route in the scope; its path template
    # ("/users/{id}") groups requests better than the concrete path.
    route = scope.get("route")
    template = getattr(route, "path", None)
    path = template if isinstance(template, str) else str(scope.get("path", ""))
    return printable(path)
