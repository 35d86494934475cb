"""What a request did to the database: statements, time, connection hold, outcome.

Off by default.  When a ``Database`` tracks statistics, SQLAlchemy engine and pool
events count each statement and time each connection checkout; the numbers go to the
``SessionContext`` of the request the event runs in (SQLAlchemy runs its sync code in
the calling task's context, so the contextvar is there).  With tracking off, no event
is registered and the request path only checks one attribute for ``None``.

The engines of a ``Database``'s read replicas are instrumented too, into fields of
their own (``replica_*``): the primary's figures keep their meaning whether or not
reads go to replicas, and a read that fell back to the primary counts there.
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
    #: Statements sent to the database's read replicas (``db.read_session``).
    replica_statements: int = 0
    #: Seconds spent waiting for those statements.
    replica_duration: float = 0.0
    #: Seconds a replica's connection was checked out for this request.
    replica_held: float = 0.0
    #: Statements that met a dead pooled connection as the first of their transaction
    #: and ran again on a new one (the request did not see it): see ``pool_pre_ping``
    #: in the README.
    reconnects: int = 0

    @property
    def all_statements(self) -> int:
        """Statements sent to the primary and to the replicas."""
        return self.statements + self.replica_statements


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


def instrument(
    sync_engine: Engine, current: Callable[[], RequestStats | None], *, replica: bool = False
) -> None:
    """Register the events that feed the ``RequestStats`` that ``current()`` returns.

    ``sync_engine`` is the engine (of an ``AsyncEngine``, its ``sync_engine``);
    ``current()`` gives the running request's statistics for this engine's database,
    or None outside a request.  A ``replica``'s figures go to the ``replica_*`` fields.
    """
    events = _ReplicaEvents(current) if replica else _Events(current)
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
            self._add_statement(stats, perf_counter() - started)

    def checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        stats = self.current()
        if stats is not None:
            record.info[_CHECKED_OUT] = (perf_counter(), stats)

    def checkin(self, dbapi_connection: Any, record: Any) -> None:
        checked_out = record.info.pop(_CHECKED_OUT, None) if record is not None else None
        if checked_out is not None:
            started, stats = checked_out
            self._add_held(stats, perf_counter() - started)

    @staticmethod
    def _add_statement(stats: RequestStats, seconds: float) -> None:
        stats.statements += 1
        stats.duration += seconds

    @staticmethod
    def _add_held(stats: RequestStats, seconds: float) -> None:
        stats.held += seconds


class _ReplicaEvents(_Events):
    """The event handlers of a read replica's engine: figures go to ``replica_*``."""

    __slots__ = ()

    @staticmethod
    def _add_statement(stats: RequestStats, seconds: float) -> None:
        stats.replica_statements += 1
        stats.replica_duration += seconds

    @staticmethod
    def _add_held(stats: RequestStats, seconds: float) -> None:
        stats.replica_held += seconds


def pool_status(sync_engine: Engine) -> PoolStatus:
    pool: Any = sync_engine.pool
    size = int(pool.size()) if hasattr(pool, "size") else 0
    checked_out = int(pool.checkedout()) if hasattr(pool, "checkedout") else 0
    checked_in = int(pool.checkedin()) if hasattr(pool, "checkedin") else 0
    overflow = int(pool.overflow()) if hasattr(pool, "overflow") else 0
    return PoolStatus(size, checked_out, checked_in, overflow)


def server_timing(all_stats: Iterable[RequestStats]) -> tuple[bytes, bytes] | None:
    """A ``Server-Timing`` header with the request's database time so far.

    ``db`` is the primaries' share; ``db-replica``, when the request read on replicas,
    theirs: two metrics, which the browser's developer tools show side by side.
    """
    all_stats = list(all_stats)
    if not all_stats:
        return None
    value = _metric("db", sum(s.duration for s in all_stats), sum(s.statements for s in all_stats))
    replica_statements = sum(s.replica_statements for s in all_stats)
    if replica_statements:
        replica_duration = sum(s.replica_duration for s in all_stats)
        value += ", " + _metric("db-replica", replica_duration, replica_statements)
    return (b"server-timing", value.encode())


def _metric(name: str, seconds: float, statements: int) -> str:
    noun = "query" if statements == 1 else "queries"
    return f'{name};dur={seconds * 1000:.1f};desc="{statements} {noun}"'


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
_REPLICA_HELD_TOO_LONG = (
    "%s %s held a read replica connection of %r for %.3f s (more than %.3f s). A "
    "handler that reads a slow request body after its first query holds the connection "
    "meanwhile: read the body first."
)
_TOO_MANY = "%s %s sent %d statements to %r (more than %d): an N+1 query pattern?"
_TOO_MANY_WITH_REPLICAS = (
    "%s %s sent %d statements to %r, %d of them to its read replicas (more than %d): "
    "an N+1 query pattern?"
)
_SUMMARY = "%s %s: %d statements, %.1f ms in %r, connection held %.1f ms, %s."
_SUMMARY_WITH_REPLICAS = (
    "%s %s: %d statements, %.1f ms in %r, connection held %.1f ms, %s; read replicas: "
    "%d statements, %.1f ms, connection held %.1f ms."
)


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
        "replica_statements": stats.replica_statements,
        "replica_db_seconds": round(stats.replica_duration, 6),
        "replica_held_seconds": round(stats.replica_held, 6),
        "reconnects": stats.reconnects,
    }
    held = limits.held
    if held is not None and stats.held > held:
        logger.warning(_HELD_TOO_LONG, method, route, db, stats.held, held, extra=fields)
    if held is not None and stats.replica_held > held:
        logger.warning(
            _REPLICA_HELD_TOO_LONG, method, route, db, stats.replica_held, held, extra=fields
        )
    # An N+1 pattern is one wherever its reads go: the replicas' statements count too.
    statements = stats.all_statements
    if limits.statements is not None and statements > limits.statements:
        if stats.replica_statements:
            logger.warning(
                _TOO_MANY_WITH_REPLICAS,
                method,
                route,
                statements,
                db,
                stats.replica_statements,
                limits.statements,
                extra=fields,
            )
        else:
            logger.warning(
                _TOO_MANY, method, route, statements, db, limits.statements, extra=fields
            )
    if logger.isEnabledFor(logging.DEBUG):
        figures = (
            stats.statements,
            stats.duration * 1000,
            db,
            stats.held * 1000,
            stats.outcome,
        )
        if stats.replica_statements or stats.replica_held:
            replica = (stats.replica_statements, stats.replica_duration * 1000)
            logger.debug(
                _SUMMARY_WITH_REPLICAS,
                method,
                route,
                *figures,
                *replica,
                stats.replica_held * 1000,
                extra=fields,
            )
        else:
            logger.debug(_SUMMARY, method, route, *figures, extra=fields)


def _route(scope: Scope) -> str:
    # Starlette and FastAPI put the matched route in the scope; its path template
    # ("/users/{id}") groups requests better than the concrete path.
    route = scope.get("route")
    template = getattr(route, "path", None)
    path = template if isinstance(template, str) else str(scope.get("path", ""))
    return printable(path)
