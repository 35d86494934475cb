"""Reads in autocommit: what a session of an ``autocommit_reads`` route may send.

Such a session's connection runs with SQLAlchemy's ``isolation_level="AUTOCOMMIT"``
execution option, so the driver sends no ``BEGIN`` and its ``COMMIT``/``ROLLBACK`` send
nothing: one round trip per statement, each statement its own transaction with its own
snapshot.  Nothing can then be rolled back, so a write must never reach the server:
every statement the connection is about to send passes :func:`refuse_write` first
(a ``before_cursor_execute`` listener on the autocommit engine alone, so it covers the
ORM, Core, ``exec_driver_sql`` on ``session.connection()`` and flushes alike).

A compiled statement is a read when SQLAlchemy compiled a ``SELECT`` without
``FOR UPDATE``/``FOR SHARE`` and without a data-modifying CTE.  Textual SQL is a read
when it starts with ``SELECT``, ``WITH``, ``SHOW``, ``VALUES``, ``TABLE`` or
``EXPLAIN`` and names none of ``INSERT``, ``UPDATE``, ``DELETE``, ``MERGE``, ``INTO``,
``COPY``, ``CALL``, ``EXPLAIN ANALYZE`` nor a row lock anywhere (so a literal
``'update'`` in the text is refused too: pass values as bound parameters).  Any
statement holding a second one after a semicolon is refused.  ``SET`` is refused as
well: outside a transaction it would outlive the request on the pooled connection.
Server-side cursors (``stream()``) need a transaction: refused with a
``ConfigurationError`` that says so.

What cannot be seen from the statement: a function called by a ``SELECT`` that writes
(``nextval()``, a user function, ``set_config(..., false)``, ``pg_advisory_lock()``).
The server would run it in autocommit, and what it did stays.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Engine, event

from ._errors import ConfigurationError, RollbackOnlyError
from ._statements import reads_only

__all__ = ["autocommit_engine", "write_refused"]

_TEXT_READ = re.compile(r"\s*(SELECT|WITH|SHOW|VALUES|TABLE|EXPLAIN)\b", re.IGNORECASE)
_TEXT_WRITE = re.compile(
    r"\b(INSERT|UPDATE|DELETE|MERGE|INTO|COPY|CALL|ANALY[SZ]E|SHARE)\b", re.IGNORECASE
)

#: A second statement in one string: a semicolon followed by anything but blanks.
_MORE_STATEMENTS = re.compile(r";\s*\S")

_STREAMED = (
    "A server-side cursor (session.stream(), stream_results=True, yield_per) needs a "
    "transaction, and this route reads in autocommit (autocommit_reads= or "
    "@read_only(autocommit=True)): use session.execute(), or give the route to "
    "read_only= instead."
)

_REFUSED = (
    "This route reads in autocommit (autocommit_reads= or @read_only(autocommit=True)), "
    "where each statement commits on its own and nothing can be rolled back, so "
    "{what} was refused before it was sent. Write in a route that is neither "
    "read-only nor in autocommit_reads; a read that calls a function that writes "
    "(nextval(), a procedure) belongs there too."
)


def autocommit_engine(engine: Engine) -> Engine:
    """``engine`` with ``isolation_level="AUTOCOMMIT"``, sharing its pool and events.

    ``Engine.execution_options()`` makes an ``OptionEngine``: the same pool, and the
    parent's event listeners, even those added later (its dispatch is joined to the
    parent's).  Each checkout through it sets the driver's autocommit, and the pool
    resets the isolation level when the connection comes back
    (``PoolEvents.reset``; ``Dialect.reset_isolation_level``): on asyncpg, psycopg 3,
    sqlite3 and aiosqlite both are attributes of the driver's connection, with no
    round trip (psycopg 2 sends ``SET default_transaction_isolation`` once the level
    was reset: see docs/guides/autocommit-reads.md).  Made once per engine and kept on it,
    so that it lives as long as the engine does.
    """
    made: Engine | None = engine.__dict__.get(_ON_ENGINE)
    if made is None:
        made = engine.execution_options(isolation_level="AUTOCOMMIT")
        # On the OptionEngine alone (its dispatch is joined to the parent's, not the
        # reverse): every connection it lends is checked, and no other.
        event.listen(made, "before_cursor_execute", refuse_write)
        setattr(engine, _ON_ENGINE, made)
    return made


_ON_ENGINE = "_asgi_sqla_autocommit_engine"


def write_refused(what: str) -> RollbackOnlyError:
    """The error for a write (``what``) attempted in an autocommit read session."""
    return RollbackOnlyError(_REFUSED.format(what=what))


def refuse_write(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    """``before_cursor_execute``: raise unless ``statement`` is a plain read (module doc)."""
    if not _is_read(statement, context):
        raise write_refused(f"{_kind(statement)} statement")
    if context.execution_options.get("stream_results"):
        # asyncpg: "cursor cannot be created outside of a transaction"; psycopg: "DECLARE
        # CURSOR can only be used in transaction blocks".  Refused on every database,
        # so that an app tried on SQLite, where it would pass, fails the same way.
        # The server-side cursor, made but never declared, is closed here: SQLAlchemy 2.0
        # leaves it to the garbage collector after an error of a listener (psycopg then
        # warns that it "was deleted while still open").
        cursor.close()
        raise ConfigurationError(_STREAMED)


def _is_read(statement: str, context: Any) -> bool:
    if _MORE_STATEMENTS.search(statement):  # psycopg 2 sends "SELECT 1; DROP ..." whole
        return False
    return reads_only(statement, context, _text_reads)


def _text_reads(statement: str) -> bool:
    return _TEXT_READ.match(statement) is not None and _TEXT_WRITE.search(statement) is None


def _kind(statement: str) -> str:
    """``an INSERT``, ``a WITH``: the statement's first word (never its values)."""
    word = statement.split(None, 1)[0].upper() if statement.strip() else "empty"
    return f"an {word}" if word[0] in "AEIOU" else f"a {word}"
