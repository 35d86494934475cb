"""What a request did to the database: statements, time, connection hold, outcome.

Off by default.  When a ``Database`` tracks statistics, SQLAlchemy engine and pool
events count each statement and time each connection checkout; the numbers go to the
``SessionContext`` of the request the event runs in (SQLAlchemy runs its sync code in
the calling task's context, so the contextvar is there).  With tracking off, no event
is registered and the request path only checks one attribute for ``None``.

The engines of a ``Database``'s read replicas are instrumented too, into fields of
their own (``replica_*``): the primary's figures keep their meaning whether or not
reads go to replicas, and a read that fell back to the primary counts there.

Round trips are counted from the same events (see ``RequestStats.round_trips``): each
statement; the ``BEGIN`` that asyncpg and psycopg send as a message of their own before
a transaction's first statement (psycopg: ``Connection._start_query`` runs it with
``_exec_command``; SQLAlchemy's asyncpg adapter: ``_start_transaction``); the
``COMMIT`` or ``ROLLBACK`` of a transaction the driver had begun (the drivers send none
for one that ran no statement, nor in autocommit); and a pool pre-ping
(``Pool._pre_ping`` in ``sqlalchemy/pool/base.py``: every checkout but a new
connection's), which SQLAlchemy's asyncpg adapter wraps in a ``BEGIN`` and a
``ROLLBACK`` (``_async_ping``, for PgBouncer) and the others send alone.
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
#: On a connection's ``info``: SQLAlchemy began a transaction, the driver has sent nothing.
_BEGUN = "asgi_sqla.transaction_begun"
#: On a connection's ``info``: the driver has a transaction open on the server.
_OPEN = "asgi_sqla.transaction_open"
#: On a pool record's ``info``: a new connection, which the pool does not pre-ping.
_FRESH = "asgi_sqla.fresh_connection"

#: The drivers (``dialect.driver``) that send ``BEGIN`` as a round trip of its own.
#: psycopg 2 too (``pq_begin_transaction``); the MySQL drivers send none (the server
#: starts a transaction implicitly), and SQLite has no server.
_SEPARATE_BEGIN = frozenset({"asyncpg", "psycopg", "psycopg2"})


@dataclass
class RequestStats:
    """One database's share of one request (or websocket, or ``db.scope()``)."""

    statements: int = 0
    """Statements sent to the database, failed ones included."""
    duration: float = 0.0
    """Seconds spent waiting for those statements."""
    held: float = 0.0
    """Seconds a connection was checked out from the pool for this request."""
    outcome: Outcome = "none"
    """How the last transaction ended: committed, rolled back or failed to commit."""
    replica_statements: int = 0
    """Statements sent to the database's read replicas (``db.read_session``)."""
    replica_duration: float = 0.0
    """Seconds spent waiting for those statements."""
    replica_held: float = 0.0
    """Seconds a replica's connection was checked out for this request."""
    round_trips: int = 0
    """Round trips to the database as far as SQLAlchemy's events show them: each
    statement, the ``BEGIN`` a driver sends on its own (asyncpg, psycopg), the
    ``COMMIT`` or ``ROLLBACK``, a pool pre-ping.  Not seen: what a driver does
    inside one statement (asyncpg prepares a statement on its first use on a
    connection: one more round trip) and a new connection's set-up.
    """
    replica_round_trips: int = 0
    """The same, to the read replicas."""
    reconnects: int = 0
    """Statements that met a dead pooled connection as the first of their transaction
    and ran again on a new one (the request did not see it): see
    docs/guides/restarts.md (no ``pool_pre_ping`` needed).
    """

    @property
    def all_statements(self) -> int:
        """Statements sent to the primary and to the replicas."""
        return self.statements + self.replica_statements


@dataclass(frozen=True)
class PoolStatus:
    """A snapshot of a connection pool, for health endpoints and metrics."""

    size: int
    """Connections the pool keeps (``pool_size``)."""
    checked_out: int
    """Connections currently checked out by requests."""
    checked_in: int
    """Connections idle in the pool."""
    overflow: int
    """Connections open beyond ``size`` (negative while the pool is still filling)."""


def instrument(
    sync_engine: Engine, current: Callable[[], RequestStats | None], *, replica: bool = False
) -> None:
    """Register the events that feed the ``RequestStats`` that ``current()`` returns.

    ``sync_engine`` is the engine (of an ``AsyncEngine``, its ``sync_engine``);
    ``current()`` gives the running request's statistics for this engine's database,
    or None outside a request.  A ``replica``'s figures go to the ``replica_*`` fields.
    """
    events = (_ReplicaEvents if replica else _Events)(current, sync_engine)
    event.listen(sync_engine, "before_cursor_execute", events.before_cursor_execute)
    event.listen(sync_engine, "after_cursor_execute", events.after_cursor_execute)
    event.listen(sync_engine, "handle_error", events.handle_error)
    event.listen(sync_engine, "begin", events.begin)
    event.listen(sync_engine, "commit", events.end)
    event.listen(sync_engine, "rollback", events.end)
    event.listen(sync_engine.pool, "connect", events.connect)
    event.listen(sync_engine.pool, "checkout", events.checkout)
    event.listen(sync_engine.pool, "checkin", events.checkin)


class _Events:
    """The engine and pool event handlers of one instrumented engine."""

    __slots__ = ("current", "dialect", "ping_begins", "pre_ping", "separate_begin")

    def __init__(self, current: Callable[[], RequestStats | None], sync_engine: Engine) -> None:
        self.current = current
        self.dialect = sync_engine.dialect
        driver = sync_engine.dialect.driver
        self.separate_begin = driver in _SEPARATE_BEGIN
        # No public accessor: create_engine(pool_pre_ping=...) is stored as Pool._pre_ping.
        self.pre_ping = bool(getattr(sync_engine.pool, "_pre_ping", False))
        self.ping_begins = driver == "asyncpg"

    def _autocommit(self, dbapi_connection: Any) -> bool:
        """Whether the driver runs each statement on its own (no BEGIN, no COMMIT)."""
        try:
            return bool(self.dialect.detect_autocommit_setting(dbapi_connection))
        except (AttributeError, NotImplementedError):  # SQLAlchemy < 2.1, or no way to tell
            return False

    def begin(self, conn: Any) -> None:
        conn.info[_BEGUN] = True

    def end(self, conn: Any) -> None:
        if conn.invalidated:
            # Its connection is gone (SQLAlchemy raises PendingRollbackError on any use of
            # it, ``info`` included, until the transaction is rolled back): nothing is sent.
            return
        conn.info.pop(_BEGUN, None)
        if conn.info.pop(_OPEN, False):
            self._add_round_trips(1)

    def before_cursor_execute(self, conn: Any, *args: Any) -> None:
        info = conn.info
        info[_STARTED] = perf_counter()
        if info.pop(_BEGUN, False) and not self._autocommit(conn.connection.dbapi_connection):
            info[_OPEN] = True
            if self.separate_begin:
                self._add_round_trips(1)

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

    def _add_round_trips(self, count: int) -> None:
        stats = self.current()
        if stats is not None:
            self._add_round_trips_to(stats, count)

    def connect(self, dbapi_connection: Any, record: Any) -> None:
        record.info[_FRESH] = True

    def checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        stats = self.current()
        fresh = record.info.pop(_FRESH, False)
        if stats is None:
            return
        record.info[_CHECKED_OUT] = (perf_counter(), stats)
        if self.pre_ping and not fresh:
            begins = self.ping_begins and not self._autocommit(dbapi_connection)
            self._add_round_trips_to(stats, 3 if begins else 1)

    def checkin(self, dbapi_connection: Any, record: Any) -> None:
        checked_out = record.info.pop(_CHECKED_OUT, None) if record is not None else None
        if checked_out is not None:
            started, stats = checked_out
            self._add_held(stats, perf_counter() - started)

    @staticmethod
    def _add_statement(stats: RequestStats, seconds: float) -> None:
        stats.statements += 1
        stats.round_trips += 1
        stats.duration += seconds

    @staticmethod
    def _add_round_trips_to(stats: RequestStats, count: int) -> None:
        stats.round_trips += count

    @staticmethod
    def _add_held(stats: RequestStats, seconds: float) -> None:
        stats.held += seconds


class _ReplicaEvents(_Events):
    """The event handlers of a read replica's engine: figures go to ``replica_*``."""

    __slots__ = ()

    @staticmethod
    def _add_statement(stats: RequestStats, seconds: float) -> None:
        stats.replica_statements += 1
        stats.replica_round_trips += 1
        stats.replica_duration += seconds

    @staticmethod
    def _add_round_trips_to(stats: RequestStats, count: int) -> None:
        stats.replica_round_trips += count

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
    value = _metric(
        "db",
        sum(s.duration for s in all_stats),
        sum(s.statements for s in all_stats),
        sum(s.round_trips for s in all_stats),
    )
    replica_statements = sum(s.replica_statements for s in all_stats)
    if replica_statements:
        replica_duration = sum(s.replica_duration for s in all_stats)
        replica_round_trips = sum(s.replica_round_trips for s in all_stats)
        value += ", " + _metric(
            "db-replica", replica_duration, replica_statements, replica_round_trips
        )
    return (b"server-timing", value.encode())


def _metric(name: str, seconds: float, statements: int, round_trips: int) -> str:
    queries = "query" if statements == 1 else "queries"
    trips = "round trip" if round_trips == 1 else "round trips"
    return f'{name};dur={seconds * 1000:.1f};desc="{statements} {queries}, {round_trips} {trips}"'


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
        "round_trips": stats.round_trips,
        "db_seconds": round(stats.duration, 6),
        "held_seconds": round(stats.held, 6),
        "outcome": stats.outcome,
        "replica_statements": stats.replica_statements,
        "replica_round_trips": stats.replica_round_trips,
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
    # FastAPI and Starlette 1.7+ put the matched route in the scope; its path template
    # ("/users/{id}") groups requests better than the concrete path.
    route = scope.get("route")
    template = getattr(route, "path", None)
    path = template if isinstance(template, str) else str(scope.get("path", ""))
    return printable(path)
