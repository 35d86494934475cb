"""The end of a request that used several databases: two-phase commit, and its log.

Without two-phase commit the sessions end one after the other, in the order the request
first used them; once a commit fails, the databases after it are rolled back, and the
log names which committed and which did not.  The client gets a 500 either way.

With ``SQLAlchemyMiddleware(app, db1, db2, two_phase=True)`` (PostgreSQL only) the
sessions are made with SQLAlchemy's ``twophase=True``: each one's connection begins a
``TwoPhaseTransaction`` with a generated xid.  That is SQLAlchemy's own mechanism:
``Session.prepare()`` flushes and runs ``PREPARE TRANSACTION 'xid'``, and a later
``commit()`` of the prepared session runs ``COMMIT PREPARED 'xid'`` (``close()`` runs
``ROLLBACK PREPARED``).  It has to be chosen when the session begins, before the request
says which databases it will use, but the prepare is only done when it is needed: at
the end, every session in a transaction is flushed and asked whether it wrote
(``txid_current_if_assigned()``).  With fewer than two writers nothing is prepared (the
sessions' ``twophase`` flag is turned off, so they commit in one phase).  Otherwise
every writer is prepared, in first-use order; if one fails to prepare, all roll back
(``ROLLBACK PREPARED`` for those already prepared) and nothing is committed.  Once all
are prepared the decision is to commit, so a ``COMMIT PREPARED`` that fails does not
stop the others, and is resolved on a new connection: ``txid_status()`` tells whether
the first attempt committed after all, and a transaction still prepared is committed
there.  Only one that cannot be committed leaves the request partly saved (500, and an
ERROR naming the xid to finish by hand).  PostgreSQL refuses ``PREPARE TRANSACTION``
unless the server's ``max_prepared_transactions`` is above 0 (startup checks it).

On MySQL and MariaDB the same SQLAlchemy mechanism sends XA statements (``XA BEGIN``,
``XA END`` and ``XA PREPARE``, ``XA COMMIT``; ``XA ROLLBACK``).  Two things differ.
Whether a transaction wrote cannot be asked of the server as it is now
(``information_schema.innodb_trx`` is a copy refreshed at most every 0.1 s), so every
session in a transaction counts as a writer: one that only read is prepared too, which
costs round trips, where committing a writer in one phase would break the atomicity.
And a failed ``XA COMMIT`` is resolved with ``XA RECOVER``, which lists the
transactions still prepared: one listed is committed there (tried again for up to
:data:`_XA_RELEASE_SECONDS` while the lost connection's server thread still holds it);
one not listed has committed or been rolled back, and the server keeps no record of
which, so the request is answered as failed and the log says the outcome is unknown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.engine import TwoPhaseTransaction
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._log import logger
from ._replicas import ReplicaSlot, end_read_session
from ._session import (
    GuardedSession,
    _unguarded,
    _wait_until_idle,
    ending_here,
    retire,
    run_to_completion,
)
from ._unavailable import mysql_error_code

#: A database, as this module sees it: a key that names itself in the log.
Database = TypeVar("Database", bound=Hashable)
#: A request's session, async or synchronous (read sessions are async).
_Session = TypeVar("_Session")

__all__ = [
    "TwoPhase",
    "commit_one_phase",
    "commit_prepared_again",
    "end_read_sessions",
    "log_partial_commit",
    "prepare_writers",
]


async def end_read_sessions(
    sessions: Mapping[Any, _Session], reason: str
) -> tuple[dict[Any, _Session], BaseException | None]:
    """Close the read sessions (they never commit).

    Returns the primary sessions, and a cancellation that arrived meanwhile (the closes
    finished first), for the caller to re-raise once those are ended too.
    """
    primaries: dict[Any, _Session] = {}
    cancelled: BaseException | None = None
    for key, session in sessions.items():
        if isinstance(key, ReplicaSlot) and isinstance(session, GuardedSession):
            try:
                await end_read_session(session, reason)
            except asyncio.CancelledError as exc:  # the close finished; carry on
                cancelled = exc
        else:
            primaries[key] = session
    return primaries, cancelled


@dataclass
class Written:
    """A session's transaction, as seen just before the end of the request."""

    xid: str  # SQLAlchemy's two-phase transaction id, for PREPARE TRANSACTION
    txid: int | None  # PostgreSQL's transaction id, for txid_status(); None for XA


@dataclass
class TwoPhase:
    """What the prepare phase did."""

    #: The prepared databases, in first-use order: these are committed (or all rolled back).
    prepared: dict[Any, Written] = field(default_factory=dict)
    #: The error that stopped the prepare phase; nothing is committed then.
    error: BaseException | None = None
    failed: Any = None
    #: A cancellation that arrived meanwhile (re-raised once every session has ended).
    cancelled: BaseException | None = None


async def prepare_writers(
    sessions: Mapping[Database, GuardedSession],
    wants_commit: Callable[[Database], bool],
    reason: str,
) -> TwoPhase:
    """Prepare every session that wrote, when at least two did (see the module doc)."""
    outcome = TwoPhase()
    writers = await _find_writers(sessions, wants_commit, reason, outcome)
    for session in sessions.values():
        session.sync_session.twophase = False  # a one-phase commit, unless prepared below
    if len(writers) < 2 or outcome.error is not None:
        return outcome
    for db, session, written in writers:
        session.sync_session.twophase = True
        try:
            await run_to_completion(_prepare(session))
        except asyncio.CancelledError as exc:
            outcome.cancelled = exc  # the prepare finished (run_to_completion)
        except BaseException as exc:
            outcome.error, outcome.failed = exc, db
            logger.error(_PREPARE_FAILED, db, _names(d for d, _, _ in writers))
            return outcome
        outcome.prepared[db] = written
    return outcome


_PREPARE_FAILED = (
    "Two-phase commit: %r failed to prepare, so nothing is committed: %s are rolled back."
)


async def _find_writers(
    sessions: Mapping[Database, GuardedSession],
    wants_commit: Callable[[Database], bool],
    reason: str,
    outcome: TwoPhase,
) -> list[tuple[Database, GuardedSession, Written]]:
    """The sessions to commit that wrote, probed only when two or more may have."""
    candidates = [
        (db, session)
        for db, session in sessions.items()
        if wants_commit(db) and session.sync_session.in_transaction()
    ]
    writers: list[tuple[Database, GuardedSession, Written]] = []
    if len(candidates) < 2:
        return writers
    probes: dict[Database, Written | None] = {}
    for db, session in candidates:
        retire(session, reason)  # nothing new may start on it from now on
        try:
            await run_to_completion(_probe(session, db, probes))
        except asyncio.CancelledError as exc:  # the probe finished (run_to_completion)
            outcome.cancelled = exc
        except BaseException as exc:  # a flush failed: nothing commits
            outcome.error, outcome.failed = exc, db
            break
        written = probes.get(db)
        if written is not None:
            writers.append((db, session, written))
    return writers


async def _probe(
    session: GuardedSession, db: Database, probes: dict[Database, Written | None]
) -> None:
    with ending_here(session):
        await _wait_until_idle(session)
        probes[db] = await _unguarded(session).run_sync(_probe_sync)


async def _prepare(session: GuardedSession) -> None:
    with ending_here(session):
        await _unguarded(session).run_sync(_prepare_sync)


#: The dialects whose two-phase transactions are XA transactions (see the module doc).
_XA_DIALECTS = frozenset({"mysql", "mariadb"})


def _probe_sync(sync_session: Any) -> Written | None:
    """Flush, then ask PostgreSQL whether the transaction wrote (it has a txid then).

    On MySQL and MariaDB every transaction counts as written (see the module doc).
    """
    sync_session.flush()
    connection = sync_session.connection()
    txid: int | None = None
    if connection.dialect.name not in _XA_DIALECTS:
        txid = connection.exec_driver_sql("SELECT txid_current_if_assigned()").scalar()
        if txid is None:
            return None
    transaction = connection.get_transaction()
    if not isinstance(transaction, TwoPhaseTransaction):
        raise RuntimeError("This session's transaction was not begun as a two-phase one.")
    return Written(xid=str(transaction.xid), txid=None if txid is None else int(txid))


def _prepare_sync(sync_session: Any) -> None:
    sync_session.prepare()


async def commit_one_phase(session: GuardedSession) -> None:
    """``session.commit()`` without PREPARE: for an explicit commit of one database.

    The flag is restored afterwards, so the session's next transaction begins as a
    two-phase one again and can take part in the request's final two-phase commit.
    """
    sync_session = session.sync_session
    if not sync_session.twophase:
        await session.commit()
        return
    sync_session.twophase = False
    try:
        await session.commit()
    finally:
        sync_session.twophase = True


_UNSETTLED = (
    "Two-phase commit: %r prepared its transaction as %r but could not commit it, nor "
    "find out on a new connection whether it committed. If SELECT gid FROM "
    "pg_prepared_xacts lists it, it still holds its locks: finish it with COMMIT "
    "PREPARED '%s'."
)
_SETTLED = (
    "Two-phase commit: %r's COMMIT PREPARED %r failed on the request's connection; the "
    "transaction is committed (checked on a new connection)."
)
_ROLLED_BACK_ELSEWHERE = (
    "Two-phase commit: %r's prepared transaction %r was rolled back by someone else "
    "(txid_status: %s); it is not committed."
)


_XA_UNSETTLED = (
    "Two-phase commit: %r prepared its XA transaction %r but could not commit it, nor "
    "find out on a new connection whether it committed. If XA RECOVER lists it, it "
    "still holds its locks: finish it with XA COMMIT '%s'."
)
_XA_SETTLED = (
    "Two-phase commit: %r's XA COMMIT %r failed on the request's connection; the "
    "transaction is committed (XA RECOVER still listed it, and it was committed on a new "
    "connection)."
)
_XA_UNKNOWN = (
    "Two-phase commit: %r's XA COMMIT %r failed on the request's connection, and XA "
    "RECOVER no longer lists the transaction: it was committed or rolled back, and the "
    "server keeps no record of which. It is counted as not committed."
)


async def commit_prepared_again(db: Hashable, engine: AsyncEngine, written: Written) -> bool:
    """Settle a prepared transaction whose ``COMMIT PREPARED`` failed; True if committed.

    Asks on a new connection: ``txid_status()`` is 'committed' when the first attempt
    committed before its connection failed, 'in progress' while the transaction is
    still prepared (it is then committed here), 'aborted' when someone rolled it back.
    An XA transaction is committed there if ``XA RECOVER`` still lists it.
    """
    if engine.dialect.name in _XA_DIALECTS:
        return await _xa_commit_again(db, engine, written)
    xid = written.xid.replace("'", "''")
    try:
        async with engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            status = (
                await connection.execute(text("SELECT txid_status(:txid)"), {"txid": written.txid})
            ).scalar()
            if status == "in progress":
                await connection.exec_driver_sql(f"COMMIT PREPARED '{xid}'")
                status = "committed"
    except Exception:
        logger.error(_UNSETTLED, db, written.xid, xid, exc_info=True)
        return False
    if status == "committed":
        logger.warning(_SETTLED, db, written.xid)
        return True
    logger.error(_ROLLED_BACK_ELSEWHERE, db, written.xid, status)
    return False


#: XAER_NOTA, "Unknown XID": MariaDB's answer to an XA COMMIT from another connection
#: while the transaction is still attached to the connection that prepared it.  A lost
#: connection's server thread releases it as it ends, a moment later (or once the server
#: notices that its client is gone); XA RECOVER lists it meanwhile.
_XA_UNKNOWN_XID = 1397
#: How long a failed XA COMMIT is tried again while its transaction is still attached,
#: and how often.
_XA_RELEASE_SECONDS = 2.0
_XA_RETRY_INTERVAL = 0.05


async def _xa_commit_again(db: Hashable, engine: AsyncEngine, written: Written) -> bool:
    try:
        committed = await _xa_commit_if_listed(engine, written.xid)
    except Exception:
        logger.error(_XA_UNSETTLED, db, written.xid, written.xid, exc_info=True)
        return False
    if committed:
        logger.warning(_XA_SETTLED, db, written.xid)
        return True
    logger.error(_XA_UNKNOWN, db, written.xid)
    return False


async def _xa_recover(connection: AsyncConnection) -> set[str]:
    """The global transaction ids XA RECOVER lists: prepared, neither committed nor rolled back.

    ``Connection.recover_twophase()`` runs the same statement, but SQLAlchemy 2.0's MySQL
    dialect reads its rows by column name (``row["data"]``), which 2.0's rows refuse with a
    TypeError; 2.1 reads them through ``.mappings()``, as here.
    """
    result = await connection.exec_driver_sql("XA RECOVER")
    listed = set()
    for row in result.mappings():
        gtrid = row["data"][: row["gtrid_length"]]
        listed.add(gtrid.decode() if isinstance(gtrid, bytes) else str(gtrid))
    return listed


async def _xa_commit_if_listed(engine: AsyncEngine, xid: str) -> bool:
    """``XA COMMIT`` ``xid`` on a new connection while XA RECOVER lists it; False if not.

    A transaction prepared by a connection that is gone is kept, and any connection may
    commit it (MariaDB 10.5, MDEV-742; MySQL 5.7.7), once the old connection's thread
    has released it (:data:`_XA_UNKNOWN_XID` until then).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _XA_RELEASE_SECONDS
    async with engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        while True:
            if xid not in await _xa_recover(connection):
                return False
            try:
                await connection.execute(text("XA COMMIT :xid"), {"xid": xid})
            except DBAPIError as exc:
                if mysql_error_code(exc) != _XA_UNKNOWN_XID or loop.time() > deadline:
                    raise
            else:
                return True
            await asyncio.sleep(_XA_RETRY_INTERVAL)


def log_partial_commit(
    failed: Hashable, committed: list[Hashable], rolled_back: list[Hashable]
) -> None:
    """Say which databases committed and which did not, after ``failed``'s commit failed."""
    if committed:
        logger.error(
            "%r failed to commit after %s had committed: the request's writes are only "
            "partly saved. Committed: %s. Not committed: %s (rolled back: %s).",
            failed,
            _names(committed),
            _names(committed),
            _names([failed, *rolled_back]),
            _names(rolled_back),
        )
    else:
        logger.error(
            "%r failed to commit; nothing was committed. Committed: none. Not committed: "
            "%s (rolled back: %s).",
            failed,
            _names([failed, *rolled_back]),
            _names(rolled_back),
        )


def _names(databases: Iterable[Hashable]) -> str:
    names = [repr(db) for db in databases]
    return ", ".join(names) if names else "none"
