"""Read replicas: which engine a read session uses, and when it must use the primary.

``Database(primary_url, replicas=[url, ...])`` keeps one engine per replica beside the
primary's.  ``db.read_session`` gives the current request a second lazy session, bound
to a replica chosen round-robin among those not marked down, and the middleware ends it
with the primary's session (always without committing: it only read).

What goes to the primary instead, through the request's primary session ``db.session``
(so in its transaction, seeing its uncommitted writes):

* every read once the request has written to the primary (read-your-writes).  Writes
  are noticed by an engine event on the primary (``before_cursor_execute``), which
  reads the request's context from the contextvar: any statement that is not a plain
  ``SELECT`` (DML, DDL, ``SELECT ... FOR UPDATE``, textual SQL that does not start
  with ``SELECT``, ``SHOW`` or ``SET``) counts as a write, whichever session or
  connection ran it;
* statements that lock or write, sent through the read session:
  ``SELECT ... FOR UPDATE/SHARE``, ``get(..., with_for_update=...)``, and ORM
  ``insert()``, ``update()``, ``delete()``;
* everything, when no replica answers.

A replica that fails to connect, or whose pooled connection turns out dead at the read
session's first statement, is marked down for ``replica_cooldown`` seconds and the
statement is retried on the next replica, then on the primary: only the first
statement of a read session is retried, when nothing has been read from it yet.
Routing happens in the ``AsyncSession`` methods that run statements (``execute``,
``scalar``, ``scalars``, ``get``, ``get_one``, ``stream``, ``stream_scalars``), where
the caller's own arguments are at hand; sync code given to ``run_sync`` and lazy loads
run on the read session's replica as they are.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Coroutine
from time import monotonic
from typing import Any, cast

from sqlalchemy import URL, Engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ._errors import SessionEndedError
from ._log import logger
from ._secrets import mask_text, mask_url
from ._session import GuardedSession, end_session
from ._statements import locks, reads_only

__all__ = ["ReadRoute", "ReplicaSet", "ReplicaSlot", "end_read_session", "track_writes"]


#: Text statements that do not count as writes: reads and session settings.
_TEXT_READ = re.compile(r"\s*(SELECT|SHOW|SET)\b", re.IGNORECASE)
_LOCKING = re.compile(r"\bFOR\s+(NO\s+KEY\s+UPDATE|UPDATE|KEY\s+SHARE|SHARE)\b", re.IGNORECASE)


class ReplicaSlot:
    """The key of a database's read session among a context's sessions.

    It sits beside the ``Database`` keys of the primary sessions, so the middleware
    ends read sessions with the others, but it never commits.
    """

    __slots__ = ("db",)

    def __init__(self, db: object) -> None:
        self.db = db

    def __repr__(self) -> str:
        return f"{self.db!r} read session"


class ReplicaSet:
    """The replica engines of one ``Database``, and which are usable now."""

    __slots__ = ("_down_until", "_turn", "cooldown", "engines", "slot", "urls")

    def __init__(self, db: object, urls: tuple[URL, ...], cooldown: float) -> None:
        self.slot = ReplicaSlot(db)
        self.urls = urls
        self.cooldown = cooldown
        self.engines: tuple[AsyncEngine, ...] | None = None
        self._down_until: dict[AsyncEngine, float] = {}
        self._turn = 0

    def pick(
        self, engines: tuple[AsyncEngine, ...], tried: tuple[Any, ...] = ()
    ) -> AsyncEngine | None:
        """The next replica not marked down nor ``tried``, round-robin; None if none is left.

        ``tried`` holds the replicas (async engines or their sync engines) that failed
        the caller already.
        """
        count = len(engines)
        now = monotonic()
        for offset in range(count):
            engine = engines[(self._turn + offset) % count]
            if engine in tried or engine.sync_engine in tried:
                continue
            if self._down_until.get(engine, 0.0) <= now:
                self._turn = (self._turn + offset + 1) % count
                return engine
        return None

    def mark_down(self, engine: AsyncEngine, exc: BaseException) -> None:
        """Leave ``engine`` out for ``cooldown`` seconds, saying why at WARNING."""
        self._down_until[engine] = monotonic() + self.cooldown
        logger.warning(
            "Read replica %s failed (%s); reads skip it for %g s and go to another "
            "replica, or to the primary.",
            mask_url(engine.url),
            _describe(exc, engine.url),
            self.cooldown,
        )

    def reset(self) -> None:
        self.engines = None
        self._down_until.clear()
        self._turn = 0


def _describe(exc: BaseException, url: URL) -> str:
    """The first line of ``exc``'s message, without ``url``'s secrets."""
    return mask_text(f"{type(exc).__name__}: {exc}".splitlines()[0], url)


class ReadRoute:
    """Where a read session's statements go: its replica, or the request's primary session.

    ``primary(force)`` returns the primary session when ``force`` is true or once the
    request has written to the primary (read-your-writes), else None.
    """

    __slots__ = ("engines", "primary", "replicas")

    def __init__(
        self,
        session: GuardedSession,
        replicas: ReplicaSet,
        engines: tuple[AsyncEngine, ...],
        primary: Callable[[bool], GuardedSession | None],
    ) -> None:
        self.replicas = replicas
        self.engines = engines
        self.primary = primary
        cast(ReplicaSession, session)._asgi_sqla_route = self

    def engine_of(self, sync_engine: Any) -> AsyncEngine | None:
        """The replica engine whose sync engine is ``sync_engine``."""
        for engine in self.engines:
            if engine.sync_engine is sync_engine:
                return engine
        return None


async def end_read_session(session: GuardedSession, reason: str) -> None:
    """Close a read session (it never commits), and drop its link to the context."""
    try:
        await end_session(session, commit=False, reason=reason)
    finally:
        if isinstance(session, ReplicaSession):
            session._asgi_sqla_route = None  # a retired session routes nowhere


def track_writes(sync_engine: Engine, on_write: Callable[[], None]) -> None:
    """Call ``on_write()`` whenever ``sync_engine`` runs a statement that is not a plain read."""

    def before_cursor_execute(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if not _is_plain_read(statement, context):
            on_write()

    event.listen(sync_engine, "before_cursor_execute", before_cursor_execute)


def _is_plain_read(statement: str, context: Any) -> bool:
    """Whether a statement about to run is a plain read (no write, no row lock)."""
    return reads_only(statement, context, _text_reads)


def _text_reads(statement: str) -> bool:
    return _TEXT_READ.match(statement) is not None and _LOCKING.search(statement) is None


def _needs_primary(statement: Any) -> bool:
    """Whether a statement given to the read session must run on the primary."""
    if getattr(statement, "is_dml", False):
        return True
    return locks(statement)


class ReplicaSession(GuardedSession):
    """Mixed into the session class of read sessions: routes statements (see module doc)."""

    #: Where this read session's statements go; None on a plain session.
    _asgi_sqla_route: ReadRoute | None = None
    #: The replica served a statement: no more failing over for this session.
    _asgi_sqla_connected: bool = False
    #: Every replica failed: this session's statements run on the primary session.
    _asgi_sqla_on_primary: bool = False


_Method = Callable[..., Coroutine[Any, Any, Any]]


def _routed(name: str, needs_primary: Callable[..., bool]) -> _Method:
    async def routed(self: ReplicaSession, *args: Any, **kwargs: Any) -> Any:
        replica_method: _Method = getattr(super(ReplicaSession, self), name)
        route = self._asgi_sqla_route
        if route is None:
            return await replica_method(*args, **kwargs)
        if self._asgi_sqla_ended is not None:
            raise SessionEndedError(self._asgi_sqla_ended)
        primary = route.primary(self._asgi_sqla_on_primary or needs_primary(*args, **kwargs))
        if primary is not None:
            return await getattr(primary, name)(*args, **kwargs)
        if self._asgi_sqla_connected:
            return await replica_method(*args, **kwargs)
        return await _first_read(self, name, replica_method, route, args, kwargs)

    routed.__name__ = name
    return routed


async def _first_read(
    session: ReplicaSession,
    name: str,
    replica_method: _Method,
    route: ReadRoute,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run the read session's first statement, failing over to the next replica."""
    replicas = route.replicas
    # The guarded methods, without the routing.
    guarded = cast(AsyncSession, super(ReplicaSession, session))
    tried: list[Any] = []
    while True:
        engine = session.sync_session.bind
        result, failure = await _on_replica(guarded, replica_method, args, kwargs)
        if failure is None:
            session._asgi_sqla_connected = True
            return result
        await guarded.rollback()  # forget the failed connection; nothing was read
        # Another replica or the primary serves the read: this failure made the
        # database no less available (a 5xx of the app's is not turned into a 503).
        session._asgi_sqla_unavailable = None
        async_engine = route.engine_of(engine)
        if async_engine is not None:
            replicas.mark_down(async_engine, failure)
        tried.append(engine)
        following = replicas.pick(route.engines, tuple(tried))
        if following is None:
            session._asgi_sqla_on_primary = True
            primary = route.primary(True)
            assert primary is not None  # forced: always the primary session
            return await getattr(primary, name)(*args, **kwargs)
        session.sync_session.bind = following.sync_engine


async def _on_replica(
    guarded: AsyncSession, method: _Method, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, BaseException | None]:
    """Run a statement on the session's replica: ``(result, None)``, or why to fail over."""
    try:
        await guarded.connection()
    except PoolTimeoutError:
        raise
    except Exception as exc:  # no connection: refused, timed out, starting up...
        return None, exc
    try:
        return await method(*args, **kwargs), None
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        return None, exc  # a pooled connection to a replica that went away


def _statement_needs_primary(statement: Any, *args: Any, **kwargs: Any) -> bool:
    return _needs_primary(statement)


def _get_needs_primary(*args: Any, with_for_update: Any = None, **kwargs: Any) -> bool:
    return bool(with_for_update)


for _name, _check in (
    ("execute", _statement_needs_primary),
    ("scalar", _statement_needs_primary),
    ("stream", _statement_needs_primary),
    ("get", _get_needs_primary),
    ("get_one", _get_needs_primary),
):
    setattr(ReplicaSession, _name, _routed(_name, _check))
# scalars() and stream_scalars() call execute() and stream(): routed there.


@functools.cache
def replica_class(cls: type[GuardedSession]) -> type[GuardedSession]:
    """The read-session class for ``cls``, the guarded class of the primary sessions."""
    return type(f"Replica{cls.__name__}", (ReplicaSession, cls), {})
