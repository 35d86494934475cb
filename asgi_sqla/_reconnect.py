"""A transaction's first statement, re-run on a new connection when the pooled one was dead.

A restart of the database, a backend killed, or ``idle_session_timeout`` leaves the pool
holding dead connections.  ``pool_pre_ping`` finds them with a round trip at every
checkout; without it, the first statement sent on one fails.  When that statement is
the first of its transaction, nothing of the transaction reached the database, or what
did died uncommitted with the connection (PostgreSQL rolls back the transaction of a
backend whose connection is gone): re-running it on a new connection is what the app
would have got had the connection been alive.  The guard (``_session``) does that, once
per transaction, in ``Session._execute_internal``, when all of this holds:

* the call found the transaction without a connection, so the connection was taken
  for it, as the re-run takes the new one (the same bind, the same options);
* SQLAlchemy recognised a disconnect (``DBAPIError.connection_invalidated``); it has
  then invalidated the connection and every one the pool made before it
  (``invalidate_pool_on_disconnect``), so the re-run checks out a new one;
* the failed statement was the first sent on the connection (:func:`watch_sends`), so
  none before it was answered: not a flush, not a statement of an ``after_begin`` hook
  (re-run with the new connection), not the main statement of a call whose eager loads
  failed;
* the transaction is the session's own, taken from an engine (not a test's connection
  that the pytest plugin binds, which nothing may replace), is not a savepoint, and
  is not in autocommit, where a statement may have committed before the connection
  dropped;
* the transaction is still active: a failed flush has rolled it back, and its pending
  objects are already expunged.

So flushes are not re-run, nor statements sent on the ``Connection`` that
``session.connection()`` returned, nor a session's later statements: those fail as
before (503 with Retry-After, nothing committed).
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine.default import DefaultExecutionContext
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import SessionTransaction

from ._log import logger

__all__ = ["drop_dead_connection", "log_reconnect", "taken_for_this_call", "watch_sends"]

#: On a ``Connection``: how many statements it has sent (counted up to 2, all that matters).
_SENT = "_asgi_sqla_sent"
#: Set on a pool: the ``_invalidate_time`` of the invalidation already logged.
_LOGGED = "_asgi_sqla_reconnect_logged"


# Not ``event.contains()``: SQLAlchemy keys a registration by ``id(engine)`` and forgets it
# only when the dialect's listeners are collected (``event/registry.py``), so a new engine
# at the address of a dead one whose dialect lives on looks registered while it is not.
_counting: weakref.WeakSet[Engine] = weakref.WeakSet()


def watch_sends(sync_engine: Engine) -> None:
    """Count the statements each ``Connection`` of ``sync_engine`` sends; once per dialect.

    Dialect events, not the engine's ``after_cursor_execute``: one listener on the engine
    turns on SQLAlchemy's dispatch of every connection event for every statement (a
    ``_JoinedDispatcher`` for each connection, a listener object for each event it
    reaches), measured at about 146,000 instructions a request under uvicorn, more than
    half of the middleware's cost.  A dialect listener is one call per statement, and the
    dialect's dispatch is on already for ``_unavailable``'s ``handle_error``.
    """
    if sync_engine in _counting:
        return
    _counting.add(sync_engine)
    event.listen(sync_engine, "do_execute", _sent)
    event.listen(sync_engine, "do_executemany", _sent)
    event.listen(sync_engine, "do_execute_no_params", _sent_no_params)


def _sent(
    cursor: Any, statement: str, parameters: Any, context: DefaultExecutionContext | None
) -> None:
    _count(context)


def _sent_no_params(cursor: Any, statement: str, context: DefaultExecutionContext | None) -> None:
    _count(context)


def _count(context: DefaultExecutionContext | None) -> None:
    # Returning None lets the dialect send the statement as usual.  ``context`` is None
    # for the statements SQLAlchemy runs inside another (a sequence's next value): the
    # outer statement was counted.  A Connection is made for each checkout, so the count
    # lives as long as the checkout.
    if context is not None:
        connection = context.root_connection
        sent = getattr(connection, _SENT, 0)
        if sent < 2:
            setattr(connection, _SENT, sent + 1)


def taken_for_this_call(transaction: SessionTransaction | None) -> bool:
    """Whether a call starting now takes the transaction's connection (it has none yet).

    ``Session._transaction`` and ``SessionTransaction._connections`` are private; their
    public forms (``SessionTransaction.connections``) came in SQLAlchemy 2.1.7.
    """
    return transaction is None or not transaction._connections


def drop_dead_connection(transaction: SessionTransaction | None, exc: DBAPIError) -> Engine | None:
    """Take the dead connection out of ``transaction`` if its statement may be re-run.

    Returns the connection's engine if it did (see the module doc for when), else None;
    the next statement of the
    transaction then checks out a new connection, and SQLAlchemy's ``after_begin``
    hooks run for it.  The transaction object stays the same, so a ``begin()`` block
    around the call goes on unaware, and no ORM state changes (a rollback would expunge
    the pending objects and expire the loaded ones).
    """
    if not exc.connection_invalidated or transaction is None:
        return None
    if transaction.nested or transaction.parent is not None or not transaction.is_active:
        return None
    entries = set(transaction._connections.values())
    if len(entries) != 1:
        return None
    ((connection, _, _, owned),) = entries
    if (
        not owned  # the bind was a Connection (a test's): it cannot be replaced
        or not connection.invalidated
        # The failed statement was counted (if it got as far): two means one was answered.
        or getattr(connection, _SENT, 0) > 1
        or connection.engine not in _counting
        or connection._is_autocommit_isolation()
    ):
        return None
    for key in [key for key, entry in transaction._connections.items() if entry[0] is connection]:
        del transaction._connections[key]
    # Invalidated: its transaction ends and nothing goes back to the pool, without I/O.
    engine = connection.engine
    connection.close()
    return engine


def log_reconnect(engine: Engine, exc: DBAPIError) -> None:
    """Say at INFO once per invalidation of the pool that dead connections were replaced.

    Every request that had checked out one of the pool's dead connections meets the same
    invalidation: only the first says so at INFO, the others at DEBUG.
    """
    pool = engine.pool
    invalidated = getattr(pool, "_invalidate_time", None)
    if invalidated is not None and getattr(pool, _LOGGED, None) == invalidated:
        logger.debug("A statement met a dead pooled connection and ran on a new one.")
        return
    setattr(pool, _LOGGED, invalidated)
    logger.info(
        "The pooled database connections were dead (%s: the database restarted, or closed "
        "them); the statement that found out runs again on a new connection, and the pool "
        "replaces the others as they are checked out.",
        type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__,
    )
