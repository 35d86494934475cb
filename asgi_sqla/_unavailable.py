"""Whether an error says the database is unavailable, and why: the 503 with Retry-After.

A request that failed because the database could not serve it (rather than because of
the request or the app) is answered 503 with ``Retry-After``: the same request may
succeed shortly, on the same server once it is back or on the one a failover promoted.
:func:`unavailable` reads an exception chain and returns why, or None:

* :data:`POOL_TIMEOUT`: SQLAlchemy's pool gave no connection within ``pool_timeout``.
* :data:`BUSY`: the database's ``admission_limit`` refused the request
  (``DatabaseBusyError``, see ``_admission``).
* :data:`UNREACHABLE`: the connection was lost or refused.  A statement's error counts
  when SQLAlchemy's dialect found it a disconnect (``DBAPIError.connection_invalidated``:
  psycopg2 gives "server closed the connection unexpectedly" without a SQLSTATE) or its
  SQLSTATE is of class 08 (connection exception) or 57P01/57P02/57P03 (admin shutdown,
  crash shutdown, cannot connect now).  An error raised while *acquiring* a connection
  (the guard sees ``Session._connection_for_bind`` fail and calls
  :func:`note_acquire_failure`) counts too when it is ``OSError`` (asyncpg raises
  ``ConnectionRefusedError`` unwrapped), a timeout, or a driver error without a SQLSTATE
  (libpq's connection failures, "session is read-only" for
  ``target_session_attrs=read-write`` while no host is writable yet, and asyncpg's
  ``TargetServerAttributeNotMatched``, carry none).  The same types raised by the app's
  own code (an HTTP call, a socket) do not count.  MySQL and MariaDB say it with error
  numbers (:data:`_MYSQL_UNREACHABLE`: refused, lost, killed, too many connections),
  not with a SQLSTATE of class 08, and older drivers (PyMySQL before 1.1.1, asyncmy
  0.2.9) give no SQLSTATE at all: there the number decides, at connect as elsewhere,
  so that a refused password (1045) or a missing database (1049) is not a 503.
  A driver's own error that SQLAlchemy let through untranslated counts when the
  dialect finds its connection closed (:func:`watch_disconnects`): asyncpg's
  ``InternalClientError`` "cannot switch to state N; another operation (2) is in
  progress", on SQLAlchemy before 2.0.50.
* :data:`READ_ONLY`: a write met SQLSTATE 25006 on a server that has become read-only
  under a live pool (Aurora, Patroni: the old primary turned standby, connections
  kept).  :func:`watch_disconnects` makes SQLAlchemy treat that as a disconnect, so the
  connection is invalidated, not pooled to fail again, and the pool's older
  connections are replaced at their next checkout.  Not when the package itself made
  the transaction ``READ ONLY`` (a ``read_only`` route): there 25006 is the app's
  write in a read-only route, an error like any other.

Each case was checked against real servers with asyncpg, psycopg 3 (async and sync) and
psycopg2 (tests/test_failover.py).  One difference between drivers remains: libpq
reports a refused password or a missing database at connect without a SQLSTATE, so on
psycopg and psycopg2 those are answered 503 as well, where asyncpg's 28P01 and 3D000
are answered 500.

asyncpg's "cannot switch to state": a terminated backend (a failover's shutdown, an
idle timeout) sends a FATAL ErrorResponse, then closes its socket.  An ErrorResponse
that arrives while asyncpg waits for no answer leaves its protocol waiting for a sync
message (``PROTOCOL_ERROR_CONSUME``, in ``CoreProtocol._read_server_messages``).  When
the connection's next statement, ``BEGIN`` (a pre-ping's) or ``COMMIT`` comes before
asyncpg has read the end of the connection, it fails with that ``InternalClientError``
before anything is sent (so such a COMMIT surely did not commit), and asyncpg aborts
the connection (``BaseProtocol._coreproto_error``).  SQLAlchemy 2.0.50 and 2.1 translate
the error to a DBAPI error, then find the connection closed: a disconnect, as above.
Before 2.0.50 it reached the caller as asyncpg raised it, past the disconnect check
(sqlalchemy#13241): the connection was not invalidated, and the request was answered
500; :func:`watch_disconnects` asks the dialect about it as SQLAlchemy would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection, Dialect, ExceptionContext
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ._errors import DatabaseBusyError, exception_chain

__all__ = [
    "BUSY",
    "POOL_TIMEOUT",
    "READ_ONLY",
    "UNREACHABLE",
    "mysql_error_code",
    "note_acquire_failure",
    "note_read_only_transaction",
    "sqlstate",
    "unavailable",
    "watch_disconnects",
]

#: Why the database was unavailable: said in the log line and the 503's body.
POOL_TIMEOUT = "no database connection was free within the pool timeout"
BUSY = "the database had more requests than its admission_limit"
UNREACHABLE = "the database could not be reached"
READ_ONLY = "the database server is read-only"

#: admin_shutdown, crash_shutdown, cannot_connect_now (PostgreSQL, Appendix A).
_SHUTDOWN_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})
#: read_only_sql_transaction: "cannot execute ... in a read-only transaction".
_READ_ONLY_SQLSTATE = "25006"

#: Why an exception says the database is unavailable when nothing else on it does: put
#: by :func:`note_acquire_failure` and by :class:`_LostConnections`.
_MARK = "_asgi_sqla_unavailable"

#: MySQL and MariaDB error numbers that mean the server could not be reached or dropped
#: the connection (MariaDB's "Error Codes" list; the 2000s are the client library's).
_MYSQL_UNREACHABLE = frozenset(
    {
        1040,  # ER_CON_COUNT_ERROR: too many connections
        1053,  # ER_SERVER_SHUTDOWN: server shutdown in progress
        1927,  # ER_CONNECTION_KILLED (MariaDB)
        2002,  # CR_CONNECTION_ERROR: cannot connect through the socket
        2003,  # CR_CONN_HOST_ERROR: cannot connect to the host (refused, timed out)
        2005,  # CR_UNKNOWN_HOST
        2006,  # CR_SERVER_GONE_ERROR: server has gone away
        2013,  # CR_SERVER_LOST: lost connection during a query
    }
)

#: asyncio's timeout is not the builtin one before Python 3.11.
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError)

#: Connections on which the package sent ``SET TRANSACTION READ ONLY`` (weakly: one
#: ``Connection`` serves one session transaction and goes with it).
_made_read_only: weakref.WeakSet[Connection] = weakref.WeakSet()


def sqlstate(error: BaseException | None) -> str | None:
    """The SQLSTATE of a driver error, or of the one a SQLAlchemy error wraps."""
    for candidate in (error, getattr(error, "orig", None)):
        # asyncpg and psycopg 3 name it ``sqlstate``; psycopg 2, ``pgcode``.
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


#: The packages whose exceptions carry a MySQL error number as ``args[0]``: PyMySQL (and
#: aiomysql, which raises PyMySQL's), asyncmy, mysqlclient, MySQL Connector, MariaDB
#: Connector.  Older releases (PyMySQL before 1.1.1) give no SQLSTATE, only the number.
_MYSQL_DRIVERS = frozenset({"pymysql", "asyncmy", "MySQLdb", "mysql", "mariadb"})


def mysql_error_code(error: BaseException | None) -> int | None:
    """The MySQL error number of a MySQL driver's error, or of the one a SQLAlchemy error wraps."""
    for candidate in (error, getattr(error, "orig", None)):
        if candidate is None or type(candidate).__module__.partition(".")[0] not in _MYSQL_DRIVERS:
            continue
        args = getattr(candidate, "args", ())
        if args and isinstance(args[0], int):
            return args[0]
    return None


def unavailable(exc: BaseException | None) -> str | None:
    """Why ``exc`` (or an error it came from) says the database is unavailable, or None."""
    for error in exception_chain(exc):
        if isinstance(error, PoolTimeoutError):
            return POOL_TIMEOUT
        if isinstance(error, DatabaseBusyError):
            return BUSY
        noted = getattr(error, _MARK, None)
        if isinstance(noted, str):
            return noted
        code = sqlstate(error)
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return READ_ONLY if code == _READ_ONLY_SQLSTATE else UNREACHABLE
        if code is not None and (code.startswith("08") or code in _SHUTDOWN_SQLSTATES):
            return UNREACHABLE
        if mysql_error_code(error) in _MYSQL_UNREACHABLE:
            return UNREACHABLE
    return None


def note_acquire_failure(exc: BaseException) -> None:
    """Mark ``exc``, raised while acquiring a connection, if it means none could be had."""
    if unavailable(exc) is not None:
        return
    if isinstance(exc, (OSError, *_TIMEOUTS)) or (
        # A MySQL error number not in _MYSQL_UNREACHABLE is the server's answer.
        isinstance(exc, DBAPIError) and sqlstate(exc) is None and mysql_error_code(exc) is None
    ):
        _mark(exc, UNREACHABLE)


def _mark(exc: BaseException, reason: str) -> None:
    # An exception class without a __dict__ cannot be marked: the session still is.
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _MARK, reason)


def note_read_only_transaction(connection: Connection) -> None:
    """Remember that the package made ``connection``'s transaction READ ONLY."""
    _made_read_only.add(connection)


# Not ``event.contains()``: SQLAlchemy keys a registration by ``id(engine)`` and forgets it
# only when the dialect's listeners are collected (``event/registry.py``), so a new engine
# at the address of a dead one whose dialect lives on looks registered while it is not.
_watched: weakref.WeakSet[Engine] = weakref.WeakSet()


def watch_disconnects(sync_engine: Engine) -> None:
    """Make SQLAlchemy see the disconnects it misses on ``sync_engine``; once.

    SQLSTATE 25006 on a server turned read-only, and a driver's error SQLAlchemy did not
    translate on a connection that is closed (see the module doc).
    """
    if sync_engine in _watched:
        return
    _watched.add(sync_engine)
    event.listen(sync_engine, "handle_error", _read_only_is_disconnect)
    event.listen(sync_engine, "handle_error", _untranslated_is_disconnect)
    event.listen(sync_engine, "invalidate", _LostConnections(sync_engine.dialect))


def _read_only_is_disconnect(context: ExceptionContext) -> None:
    # SQLAlchemy's documented way to treat a new error code as a disconnect: set
    # ``is_disconnect`` in a handle_error listener; the connection is then invalidated,
    # and with ``invalidate_pool_on_disconnect`` (True by default) so is every
    # connection the pool made before it ("Supporting new database error codes for
    # disconnect scenarios", https://docs.sqlalchemy.org/en/20/core/pooling.html).
    if context.is_disconnect or sqlstate(context.original_exception) != _READ_ONLY_SQLSTATE:
        return
    connection: Any = context.connection
    if connection is not None and (
        connection in _made_read_only
        or connection.get_execution_options().get("postgresql_readonly")
    ):
        return  # a write in a transaction made read-only on purpose: the app's error
    context.is_disconnect = True


def _untranslated_is_disconnect(context: ExceptionContext) -> None:
    # SQLAlchemy asks the dialect whether the connection is gone only for the DBAPI's
    # errors (``Connection._handle_dbapi_exception``); a driver's error it let through
    # untranslated (asyncpg's InternalClientError before SQLAlchemy 2.0.50) is asked
    # here, the same way, and made a disconnect like 25006 above: the connection and
    # the pool's older ones are invalidated, and ``_LostConnections`` marks the error.
    connection = context.connection
    if context.is_disconnect or connection is None or connection.closed or connection.invalidated:
        return
    dbapi_connection = connection.connection.dbapi_connection
    if _lost(context.dialect, context.original_exception, dbapi_connection):
        context.is_disconnect = True


class _LostConnections:
    """A pool ``invalidate`` listener: marks the driver's untranslated error that lost a connection.

    It sees both ways such an error invalidates a connection: a statement's or a
    COMMIT's, made a disconnect by :func:`_untranslated_is_disconnect`, and a pre-ping's,
    which the pool invalidates itself (``_ConnectionRecord._checkin_failed``) before the
    error leaves the checkout.  The event comes before the connection is closed
    (``PoolEvents.invalidate``), so the dialect still tells whether the error closed it.
    """

    # ``__weakref__``: SQLAlchemy's event registry refers to its listeners weakly.
    __slots__ = ("__weakref__", "_dialect")

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect

    def __call__(
        self, dbapi_connection: Any, connection_record: Any, exception: BaseException | None
    ) -> None:
        if exception is not None and _lost(self._dialect, exception, dbapi_connection):
            _mark(exception, UNREACHABLE)


def _lost(dialect: Dialect, error: BaseException, dbapi_connection: Any) -> bool:
    """Whether ``error`` is the driver's own, untranslated, and its connection is closed.

    The dialect says whether the connection is closed.  A DBAPI error is left to
    SQLAlchemy, which asked already (``DBAPIError.connection_invalidated``).
    """
    if isinstance(error, dialect.loaded_dbapi.Error):
        return False
    # An async driver's connection is adapted: the driver's own is ``driver_connection``.
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if _package(type(error)) != _package(type(driver)):
        return False
    try:
        # Without a cursor, as SQLAlchemy's pre-ping asks (``_do_ping_w_event``):
        # ``ExceptionContext.cursor`` is never set (``ExceptionContextImpl.__init__``).
        return bool(dialect.is_disconnect(error, dbapi_connection, None))  # type: ignore[arg-type]
    except Exception:
        # A dialect that cannot judge this error: not a disconnect.  Raising here would
        # replace the error being handled (``handle_error``) or break the checkout.
        return False


def _package(cls: type) -> str:
    return cls.__module__.partition(".")[0]
