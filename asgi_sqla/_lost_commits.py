"""A COMMIT whose connection was lost: ask PostgreSQL whether it committed.

When the connection breaks while a COMMIT is under way (a failover's shutdown, a
killed backend, a network fault), the client cannot tell whether the server
committed: the server may have written the commit record and lost the connection
before its reply arrived.  Answering 503 then claims that nothing was written when the
row may be there.  PostgreSQL keeps the answer: a recent transaction's status by its id,
``pg_xact_status`` (``txid_status`` before 13), which PostgreSQL 10 added for this very
case, a connection lost while a COMMIT was in progress (its documentation, Transaction
ID and Snapshot Information Functions); the client must learn the id itself, since the
server does not report it.

With ``confirm_lost_commits=seconds``, :func:`watch_commits` makes the engine learn the
transaction's id just before the package's COMMIT (one round trip,
``pg_current_xact_id_if_assigned()``, which assigns none to a transaction that wrote
nothing).  After such a COMMIT lost its connection, :func:`confirm` (or
:func:`confirm_here`, in a worker thread) asks a new connection, again until the
seconds have passed while no host answers or the transaction is still in progress:

* committed: the commit happened; the ending counts it as done, and the app's response
  is sent;
* aborted: nothing was committed; the 503 with ``Retry-After`` stands, now sure;
* no id: the transaction wrote nothing, so whatever became of its COMMIT, nothing
  changed; the app's response is sent;
* no answer in time: the 503 stands, as without the option, and the log says the
  outcome is unknown.

Only the package's own COMMIT is watched, at the end of a request, a websocket's unit
of work, ``db.release()`` or ``db.scope()``: :data:`_probe` is set around it.  An app's
own ``session.commit()`` or ``db.commit()`` raises to the app as before, and sends no
extra statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from ._errors import ConfigurationError
from ._log import logger
from ._unavailable import UNREACHABLE, unavailable

__all__ = ["Probe", "check_confirmable", "confirm", "confirm_here", "probing", "watch_commits"]

#: How long to wait between two questions while no host answers or the transaction is
#: still in progress (its backend has not yet noticed the lost connection).
_POLL = 0.05

#: PostgreSQL 13 renamed the txid functions (which stay, deprecated) to these.
_XID_13 = ("SELECT pg_current_xact_id_if_assigned()::text", "SELECT pg_xact_status('{}'::xid8)")
_XID_10 = ("SELECT txid_current_if_assigned()::text", "SELECT txid_status({})")

_CONFIRMED = (
    "The COMMIT's connection was lost, but the database confirms that transaction %d "
    "committed (asked a new connection after %.2f s); the app's response is sent."
)
_NOTHING_WRITTEN = (
    "The COMMIT's connection was lost; the transaction had written nothing, so nothing "
    "was lost either; the app's response is sent."
)
_ABORTED = (
    "The COMMIT's connection was lost, and the database confirms that transaction %d did "
    "not commit (asked a new connection after %.2f s): the 503 is sure."
)
_UNKNOWN = (
    "The COMMIT's connection was lost, and whether transaction %d committed could not be "
    "learnt within confirm_lost_commits=%g s (last: %s). The 503 stands and may be "
    "wrong: make writes safe to retry, or give confirm_lost_commits more seconds."
)


class Probe:
    """What one COMMIT's watch learnt: its transaction's id, where to ask about it, and
    the on_commit callbacks due if it committed."""

    __slots__ = ("asked", "callbacks", "due", "engine", "seconds", "xid")

    def __init__(self, callbacks: list[Callable[[], object]] | None) -> None:
        self.asked = 0  # how many COMMITs learnt their id: only one can be confirmed
        self.xid: int | None = None  # None once asked: the transaction wrote nothing
        self.engine: Engine | None = None
        self.seconds = 0.0
        self.callbacks = callbacks
        #: ``callbacks`` as they were when the COMMIT was sent: a failed commit clears them.
        self.due: list[Callable[[], object]] = []


#: The probe of the package's COMMIT under way in this context (see the module doc).
_probe: ContextVar[Probe | None] = ContextVar("asgi_sqla_commit_probe", default=None)


@contextlib.contextmanager
def probing(callbacks: list[Callable[[], object]] | None) -> Iterator[Probe]:
    """Watch the COMMITs sent within the block: each learns its transaction's id first.

    Only on an engine given to :func:`watch_commits`; elsewhere the probe stays empty.
    The context is copied into SQLAlchemy's greenlet (``greenlet_spawn``) and into a
    worker thread, so the engine's ``commit`` event sees the probe.  ``callbacks`` (the
    transaction's on_commit list) is copied to :attr:`Probe.due` as the COMMIT is sent,
    once before_commit hooks have added theirs.
    """
    probe = Probe(callbacks)
    token = _probe.set(probe)
    try:
        yield probe
    finally:
        _probe.reset(token)


class _Watch:
    """An engine's ``commit`` listener: the transaction's id, just before its COMMIT."""

    # ``__weakref__``: SQLAlchemy's event registry refers to its listeners weakly.
    __slots__ = ("__weakref__", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, connection: Connection) -> None:
        probe = _probe.get()
        if probe is None:
            return  # the app's own commit: no extra statement
        version = connection.dialect.server_version_info or (0,)
        if version < (10,):
            raise ConfigurationError(
                "confirm_lost_commits needs PostgreSQL 10 or later (pg_xact_status); this "
                f"server is {'.'.join(map(str, version))}. Remove confirm_lost_commits."
            )
        # Within the transaction, on its connection: the id is that transaction's.  If
        # this fails the COMMIT is not sent and the error is the commit's: nothing was
        # committed, which is what the answer will say.
        found = connection.exec_driver_sql(_sql(connection)[0]).scalar()
        probe.asked += 1
        probe.xid = int(found) if found is not None else None
        probe.engine = connection.engine
        probe.seconds = self.seconds
        probe.due = list(probe.callbacks or ())


_watches: weakref.WeakKeyDictionary[Engine, _Watch] = weakref.WeakKeyDictionary()


def check_confirmable(dialect_name: str) -> None:
    """Refuse ``confirm_lost_commits`` for a database that cannot answer it."""
    if dialect_name != "postgresql":
        raise ConfigurationError(
            "confirm_lost_commits asks PostgreSQL's pg_xact_status whether a COMMIT whose "
            f"connection was lost committed; a {dialect_name} database cannot say. Remove "
            "confirm_lost_commits."
        )


def watch_commits(sync_engine: Engine, seconds: float) -> None:
    """Have the package's COMMITs on ``sync_engine`` learn their transaction's id; once.

    An engine shared by databases with different ``seconds`` asks for the longest.
    Tracked by identity: ``event.contains`` keys by ``id(engine)``, which a new engine
    at a dead one's address shares.
    """
    check_confirmable(sync_engine.dialect.name)
    watch = _watches.get(sync_engine)
    if watch is None:
        watch = _watches[sync_engine] = _Watch(seconds)
        event.listen(sync_engine, "commit", watch)
    watch.seconds = max(watch.seconds, seconds)


def _sql(connection: Connection) -> tuple[str, str]:
    version = connection.dialect.server_version_info or (0,)
    return _XID_13 if version >= (13,) else _XID_10


def _without_asking(probe: Probe, error: BaseException) -> bool | None:
    """The answer when there is nothing to ask: False when ``error`` did not lose a COMMIT
    whose transaction ``probe`` knows, True when that transaction wrote nothing (no id);
    None: ask."""
    if probe.asked != 1 or probe.engine is None or unavailable(error) != UNREACHABLE:
        return False
    if probe.xid is None:
        logger.warning(_NOTHING_WRITTEN)
        return True
    return None


def _status(connection: Connection, xid: int) -> str | None:
    status = connection.exec_driver_sql(_sql(connection)[1].format(xid)).scalar()
    return str(status) if status is not None else None


def _settled(status: str | None, refused: BaseException | None) -> bool:
    """Whether the question is answered, or cannot be: a connected server refused it for
    another reason than a lost connection (an id too old or too new, a standby)."""
    if status in ("committed", "aborted"):
        return True
    return refused is not None and unavailable(refused) is None


def _verdict(probe: Probe, status: str | None, error: BaseException | None, began: float) -> bool:
    waited = time.monotonic() - began
    if status == "committed":
        logger.warning(_CONFIRMED, probe.xid, waited)
        return True
    if status == "aborted":
        logger.info(_ABORTED, probe.xid, waited)
        return False
    last = status or (type(error).__name__ if error is not None else "no answer")
    logger.warning(_UNKNOWN, probe.xid, probe.seconds, last)
    return False


async def confirm(probe: Probe, error: BaseException) -> bool:
    """Whether the transaction whose COMMIT raised ``error`` is known to have committed
    (or to have written nothing); asks with the engine's async driver."""
    known = _without_asking(probe, error)
    if known is not None:
        return known
    assert probe.engine is not None
    assert probe.xid is not None
    engine, xid = AsyncEngine(probe.engine), probe.xid
    began = time.monotonic()
    deadline = began + probe.seconds
    while True:
        # A task of its own, waited for with a timeout: the ending runs shielded
        # (``_session.run_driver_to_completion``), which holds back any cancellation of
        # this task, a timeout's too.  The connect may wait for the pool, or for a host
        # that does not answer.
        asking = asyncio.ensure_future(_ask(engine, xid))
        await asyncio.wait({asking}, timeout=max(deadline - time.monotonic(), 0))
        if asking.done():
            status, failed, refused = asking.result()
        else:
            asking.cancel()
            await asyncio.wait({asking})  # its connection is given back before we go on
            status, failed, refused = None, None, None
        if _settled(status, refused) or time.monotonic() >= deadline:
            return _verdict(probe, status, failed, began)
        await asyncio.sleep(_POLL)


async def _ask(
    engine: AsyncEngine, xid: int
) -> tuple[str | None, BaseException | None, BaseException | None]:
    """One question: the status, the error met, and that error if a connected server
    answered with it."""
    try:
        connection = await engine.connect()
    except Exception as exc:  # refused, shutting down, no writable host yet
        return None, exc, None
    try:
        return await connection.run_sync(_status, xid), None, None
    except Exception as exc:
        return None, exc, exc
    finally:
        with contextlib.suppress(Exception):  # its answer is what matters
            await connection.close()


def confirm_here(probe: Probe, error: BaseException) -> bool:
    """:func:`confirm` for a synchronous engine, in this (worker) thread."""
    known = _without_asking(probe, error)
    if known is not None:
        return known
    assert probe.engine is not None
    assert probe.xid is not None
    engine, xid = probe.engine, probe.xid
    began = time.monotonic()
    deadline = began + probe.seconds
    while True:
        status: str | None = None
        failed: BaseException | None = None
        refused: BaseException | None = None
        try:
            connection = engine.connect()
        except Exception as exc:  # refused, shutting down, no writable host yet
            failed = exc
        else:
            try:
                status = _status(connection, xid)
            except Exception as exc:
                failed = refused = exc
            finally:
                with contextlib.suppress(Exception):  # its answer is what matters
                    connection.close()
        if _settled(status, refused) or time.monotonic() >= deadline:
            return _verdict(probe, status, failed, began)
        time.sleep(_POLL)
