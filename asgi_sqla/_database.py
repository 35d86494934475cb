"""``Database``: one engine for the life of the app, one lazy session per request."""

from __future__ import annotations

import asyncio
import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Generic, NamedTuple, Protocol, cast

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy import __version__ as sqlalchemy_version
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
)
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
from sqlalchemy.orm import Session
from typing_extensions import Self, TypeVar

from ._admission import Admission
from ._credentials import PasswordListener, PasswordProvider, check_provider, install_provider
from ._environ import read_environment
from ._errors import ConfigurationError, DatabaseStartupError
from ._lost_commits import check_confirmable, watch_commits
from ._multidb import commit_one_phase
from ._options import (
    check_block_options,
    check_bool,
    check_engine_options,
    check_number,
    check_session_options,
)
from ._outcome import Outcome
from ._reconnect import watch_sends
from ._replicas import ReplicaSet, replica_class, track_writes
from ._saturation import pool_capacity, watch_saturation
from ._secrets import mask_text, mask_url
from ._session import (
    ROLLBACK_ONLY,
    GuardedSession,
    add_before_commit,
    add_on_commit,
    guarded_class,
    run_to_completion,
    sync_of,
)
from ._stats import Limits, PoolStatus, RequestStats, instrument, pool_status
from ._threaded import AnySession
from ._unavailable import watch_disconnects
from ._unit import SCOPE_EXITED, SessionContext, current_context

__all__ = [
    "BaseDatabase",
    "Database",
    "check_hook",
    "commit_below_400",
    "raise_failure",
    "with_class",
]

#: The session class: ``AsyncSession``, or the one given as ``session_class``.
_A = TypeVar("_A", bound=AsyncSession, default=AsyncSession, covariant=True)

#: The pip extra (``pip install 'asgi-sqla[NAME]'``) that installs each driver.
_DRIVER_EXTRAS = {
    "psycopg2": "psycopg2",
    "asyncpg": "asyncpg",
    "psycopg": "psycopg",
    "psycopg_async": "psycopg",
    "aiosqlite": "aiosqlite",
    "aiomysql": "aiomysql",
    "asyncmy": "asyncmy",
}


_NOT_ASYNCIO = (
    "asgi_sqla needs a running asyncio event loop here, and there is none. In a "
    "synchronous `def` endpoint or dependency (run in a worker thread) an AsyncSession "
    "cannot be used: make it `async def`, or use a SyncDatabase, whose sessions are "
    "synchronous. Under trio, SQLAlchemy's async drivers cannot "
    "run: serve the app on asyncio (uvicorn does; hypercorn needs --worker-class asyncio)."
)


def commit_below_400(status: int) -> bool:
    """The default ``commit_on`` policy: commit when the status is below 400."""
    return status < 400


class BaseDatabase(ABC):
    """What ``Database`` (async) and ``SyncDatabase`` share: an engine for the life of
    the app, the options, statistics, and the way into the current unit of work.

    Subclasses say which flavour they are with the class attributes below, and add
    the API whose calls differ (``async def commit()`` or ``def commit()``).
    """

    #: The engine class this database runs on.
    _engine_type: type[AsyncEngine] | type[Engine]
    #: Makes a sessions' factory for an engine (or, for replicas, without one).
    _maker_type: Callable[..., Callable[..., Any]]
    _replicas: ReplicaSet | None = None
    #: Each task other than the first gets a session of its own (``Database`` only).
    _session_per_task = False
    #: The engine whose missed disconnects are seen (``_unavailable.watch_disconnects``).
    _disconnects_watched: Engine | None = None

    def __init__(
        self,
        source: _EngineSource,
        *,
        commit_on: Callable[[int], bool] | None,
        session_options: dict[str, Any],
        stats: bool,
        warn_held_over: float | None,
        warn_statements_over: int | None,
        password: object = None,
        admission_limit: int | None = None,
        admission_timeout: float = 0.0,
        warn_pool_saturated_for: float | None = None,
        pool_saturated_share: float = 0.9,
        confirm_lost_commits: float | None = None,
    ) -> None:
        self._warn_held, self._warn_statements = _limits(warn_held_over, warn_statements_over)
        check_bool("stats", stats)
        self._stats = stats or warn_held_over is not None or warn_statements_over is not None
        self._instrumented: Engine | None = None
        self._instrumented_replicas: tuple[AsyncEngine, ...] | None = None
        self._url, self._engine, self._engine_factory, self._engine_options = source
        self._owns_engine = self._engine is None
        provider = check_provider(
            password,
            url=self._url,
            ready_engine=self._engine is not None,
            sync=self._engine_type is Engine,
        )
        #: Sets the provider's password on each new connection of the engines made here.
        self._password_listener = (
            PasswordListener(provider, can_await=self._engine_type is AsyncEngine)
            if provider is not None
            else None
        )
        if commit_on is not None and not callable(commit_on):
            raise ConfigurationError(
                "commit_on must be a function (status_code) -> bool, or None to never "
                "commit automatically."
            )
        self._commit_on = commit_on
        self._session_options = session_options
        #: Where sessions come from: the engine's pool, or a test's connection (the
        #: pytest plugin swaps it with :meth:`_sessions_from`).
        self._factory: SessionFactory = EngineSessions(self)
        self._default_factory = self._factory
        self._writes_tracked: Engine | None = None
        #: Set by a middleware with ``retry=`` routes: every commit of a session is
        #: noted in the request's unit of work, which is then never re-run.
        self._track_commits = False
        #: Set by a middleware with ``two_phase=True``: startup checks the server allows it.
        self._two_phase_check = False
        self._admission = _admission(self, admission_limit, admission_timeout)
        self._saturation = _saturation(warn_pool_saturated_for, pool_saturated_share)
        self._saturation_watched: Engine | None = None
        if self._saturation is not None:
            self._check_pool_bounded()
        self._confirm_lost_commits = _confirming(self, confirm_lost_commits)
        self._commits_watched: Engine | None = None

    @classmethod
    def from_env(cls, prefix: str | None = None, /, **options: Any) -> Self:
        """A database configured by environment variables, for an app configured by its
        deployment (twelve-factor style).

        Reads ``DATABASE_URL`` (required), and the engine options ``DATABASE_POOL_SIZE``,
        ``DATABASE_MAX_OVERFLOW``, ``DATABASE_POOL_TIMEOUT``, ``DATABASE_POOL_RECYCLE``,
        ``DATABASE_POOL_PRE_PING``, ``DATABASE_ECHO`` and, for ``Database`` only,
        ``DATABASE_REPLICAS`` (comma-separated URLs) when they are set.  With a
        ``prefix``, every name starts with it: ``from_env("ANALYTICS")`` reads
        ``ANALYTICS_DATABASE_URL``, ``ANALYTICS_DATABASE_POOL_SIZE``...  Like the
        constructor, it reads the variables at once and connects to nothing.

        :param prefix: Letters, digits and underscores, the ``_`` after it added here.
        :param options: Keywords of the class, as for the constructor (``stats=True``,
            ``connect_args={...}``); one given here wins over its variable, which is
            then not read.  Not ``url`` nor ``engine``: those come from the variables.
        :raises ConfigurationError: The URL variable is missing, or a variable's value is
            not of its form; the message names the variable, and never shows a URL.
        """
        sync = cls._engine_type is Engine
        url, found = read_environment(prefix, os.environ, sync=sync, given=options)
        # The constructors of Database and SyncDatabase take the URL first; this base
        # class's takes an _EngineSource.
        construct = cast(Callable[..., Self], cls)
        return construct(url, **found, **options)

    def __repr__(self) -> str:
        if self._url is not None:
            target = mask_url(self._url)
        elif self._engine is not None:
            target = mask_url(self._engine.url)
        else:
            target = "engine factory"
        return f"{type(self).__name__}({target!r})"

    def _ready_engine(self) -> AsyncEngine | Engine:
        """The engine, created now if needed, with the events this database needs."""
        engine = self._engine
        if engine is None:
            engine = self._engine = self._create_engine()
        sync_engine = _sync_engine(engine)
        if self._disconnects_watched is not sync_engine:
            # A pooled connection to a server turned read-only (a failover) is discarded,
            # and so is one a driver's untranslated error found closed.
            watch_disconnects(sync_engine)
            # A dead pooled connection met by a transaction's first statement is replaced.
            watch_sends(sync_engine)
            self._disconnects_watched = sync_engine
        if self._stats and self._instrumented is not sync_engine:
            instrument(sync_engine, self._current_stats)
            self._instrumented = sync_engine
        if self._replicas is not None and self._writes_tracked is not sync_engine:
            track_writes(sync_engine, self._note_write)  # read-your-writes
            self._writes_tracked = sync_engine
        confirming = self._confirm_lost_commits
        if confirming is not None and self._commits_watched is not sync_engine:
            watch_commits(sync_engine, confirming)  # refuses a database other than PostgreSQL
            self._commits_watched = sync_engine
        saturation = self._saturation
        if saturation is not None and self._saturation_watched is not sync_engine:
            watch_saturation(self, sync_engine, *saturation)
            self._saturation_watched = sync_engine
        return engine

    def _check_pool_bounded(self) -> None:
        """Refuse now a pool that cannot saturate, when the engine's pool is known.

        For a URL, the pool is the one an engine made with the options would have
        (made and dropped: no connection); an engine factory's is checked at startup.
        """
        engine = self._engine
        if engine is None and self._url is not None:
            try:
                engine = self._engine_for(self._url)
            except ConfigurationError:
                return  # the driver is missing: startup says which extra installs it
        if engine is not None:
            pool_capacity(self, _sync_engine(engine).pool)

    def _current_stats(self) -> RequestStats | None:
        context = current_context.get()
        return context.stats(self) if context is not None else None

    def _note_write(self) -> None:
        context = current_context.get()
        if context is not None:
            context.note_write(self)

    @property
    def replica_engines(self) -> tuple[AsyncEngine, ...]:
        """The engines of the ``replicas``, created now if needed; ``()`` without replicas."""
        replicas = self._replicas
        if replicas is None:
            return ()
        engines = replicas.engines
        if engines is None:
            engines = replicas.engines = tuple(
                cast(AsyncEngine, self._engine_for(url)) for url in replicas.urls
            )
            for replica in engines:
                watch_disconnects(replica.sync_engine)
                watch_sends(replica.sync_engine)
        if self._stats and self._instrumented_replicas is not engines:
            # Here rather than where they are made: every read session's engine is
            # picked from this tuple, so engines made before statistics were turned on
            # (``_track_stats``) are instrumented before their first counted statement.
            self._instrument_replicas(engines)
        return engines

    def _instrument_replicas(self, engines: tuple[AsyncEngine, ...]) -> None:
        """Count the statements of the replica ``engines`` in :attr:`stats` (``replica_*``)."""
        for engine in engines:
            instrument(engine.sync_engine, self._current_stats, replica=True)
        self._instrumented_replicas = engines

    @property
    def stats(self) -> RequestStats | None:
        """What the current request has done with this database so far.

        ``None`` unless the database tracks statistics (``stats=True``, or a
        ``warn_*`` threshold, or the middleware's ``server_timing``), or outside a
        request, websocket or ``db.scope()``.
        """
        context = current_context.get()
        if not self._stats or context is None:
            return None
        return context.stats(self)

    def pool_status(self) -> PoolStatus:
        """Size, checked-out, idle and overflow connections of the pool, right now."""
        return pool_status(_sync_engine(self._ready_engine()))

    def _track_stats(self) -> None:
        """Turn statistics on (the middleware does, for ``server_timing``)."""
        self._stats = True
        if self._engine is not None:
            self._ready_engine()  # instruments the engine made before this call

    @property
    def limits(self) -> Limits:
        """The warning thresholds (``warn_held_over``, ``warn_statements_over``)."""
        return Limits(self._warn_held, self._warn_statements)

    @property
    def commit_on(self) -> Callable[[int], bool] | None:
        """The policy deciding from a status whether a request commits (None: never)."""
        return self._commit_on

    def set_rollback_only(self) -> None:
        """Mark the current transaction so that it rolls back, whatever the status.

        The automatic end of the request then rolls back even a 2xx, on_commit callbacks
        are dropped, and every commit of the session raises ``RollbackOnlyError``:
        ``commit()``, the end of a ``session.begin()`` block, a commit in ``run_sync``.
        The mark ends with the session (after ``release()``, a new session starts
        unmarked).
        """
        self._context_session()._asgi_sqla_rollback_only = ROLLBACK_ONLY

    def _own_unit(
        self, where: str, commit: bool | None, read_only: bool, options: Mapping[str, Any]
    ) -> SessionContext:
        """A unit of work of this database alone, for the block ``where`` (``db.scope``).

        ``commit`` is the block's commit policy, ``options`` its sessionmaker keywords
        (checked here, before anything opens).  The block is read-only when asked, and
        inside a read-only route whatever is asked: the route's rule is the stronger.
        """
        check_bool("commit", commit, also=(None,), example=f"{where}(commit=True)")
        check_bool("read_only", read_only, example=f"{where}(read_only=True)")
        if read_only and commit:
            raise ConfigurationError(
                f"{where}(read_only=True, commit=True) asks a read-only block to commit, "
                "which it cannot: drop one of them."
            )
        unit = SessionContext((self,))
        if options:
            class_ = self._session_options["class_"]
            unit.session_options = check_block_options(options, class_, where)
        enclosing = current_context.get()
        if read_only or (enclosing is not None and enclosing.read_only):
            unit.read_only = True
        unit.commit = commit
        return unit

    def _context_session(self) -> AnySession:
        """The current context's session object (no connection is taken for it)."""
        return SessionContext.current().session(self)

    def _current_session(self) -> AnySession | None:
        context = current_context.get()
        return context.existing(self) if context is not None else None

    def _make_session(self, **options: Any) -> AnySession:
        session = self._factory.make(**options)
        if self._track_commits:
            event.listen(sync_of(session), "after_commit", _note_commit)
        if self._stats:
            sync_of(session)._asgi_sqla_count_reconnect = self._count_reconnect
        return session

    def _make_replica_session(self, engine: AsyncEngine) -> GuardedSession | None:
        """A read session bound to the replica ``engine`` (routing: ``_replicas``)."""
        session = self._factory.make_read(engine)
        if session is not None and self._stats:
            sync_of(session)._asgi_sqla_count_reconnect = self._count_reconnect
        return session

    def _count_reconnect(self) -> None:
        stats = self._current_stats()
        if stats is not None:
            stats.reconnects += 1

    def _can_prepare(self) -> bool:
        """Whether this database's sessions can take part in a two-phase commit."""
        return self._factory.can_prepare

    @contextmanager
    def _sessions_from(self, factory: SessionFactory) -> Iterator[None]:
        """Make the sessions opened in the block with ``factory`` (the pytest plugin's).

        While it lasts, disposing leaves the engine alone when the factory
        ``pins_engine``: a test's connection is still open on it.
        """
        if self._factory is not self._default_factory:
            raise ConfigurationError(f"{self!r} is already bound to a test's transaction.")
        self._factory = factory
        try:
            yield
        finally:
            self._factory = self._default_factory

    def _create_engine(self) -> AsyncEngine | Engine:
        if self._engine_factory is not None:
            engine = self._engine_factory()
            if not isinstance(engine, self._engine_type):
                raise ConfigurationError(_wrong_engine(self, engine))
            return self._authenticating(engine)
        url = self._url
        assert url is not None  # either a URL, an engine or a factory was given
        return self._engine_for(url)

    def _engine_for(self, url: URL) -> AsyncEngine | Engine:
        """An engine the package owns, for ``url`` (the primary's or a replica's)."""
        # A failed statement's exception shows its parameters, row data, and it is
        # logged when a commit fails: hidden unless the app asks for them.
        options = {"hide_parameters": True, **self._engine_options}
        create = create_engine if self._engine_type is Engine else _create_async_engine
        try:
            engine = create(url, **options)
        except ImportError as exc:
            driver = url.get_driver_name()
            extra = _DRIVER_EXTRAS.get(driver)
            fix = f"pip install 'asgi-sqla[{extra}]'" if extra else f"install the {driver!r} driver"
            raise ConfigurationError(
                f"The driver for {mask_url(url)} could not be loaded "
                f"({mask_text(str(exc), url)}): {fix}."
            ) from None
        return self._authenticating(engine)

    def _authenticating(self, engine: AsyncEngine | Engine) -> AsyncEngine | Engine:
        """``engine``, which asks the ``password`` provider for each new connection's
        password when the database has one (a ``do_connect`` listener)."""
        if self._password_listener is not None:
            install_provider(_sync_engine(engine), self._password_listener)
        return engine

    @property
    @abstractmethod
    def engine(self) -> AsyncEngine | Engine:
        """The engine, created now if the app has not started it yet."""

    @property
    @abstractmethod
    def session(self) -> AsyncSession | Session:
        """The session of the current request, websocket or ``db.scope()``."""

    @abstractmethod
    async def _start(self) -> None:
        """Create the engine and check that the database answers (lifespan startup)."""

    @abstractmethod
    async def _stop(self) -> None:
        """Dispose the engines (lifespan shutdown)."""

    def _startup_error(self, exc: Exception, engine: AsyncEngine | Engine) -> DatabaseStartupError:
        return DatabaseStartupError(
            f"{self!r} did not answer at startup: "
            f"{type(exc).__name__}: {mask_text(str(exc), engine.url)}"
        )

    def _forget_engine(self) -> AsyncEngine | Engine | None:
        """Drop the engine this database made, for disposal; None if there is none to drop.

        Nothing is dropped while a test's transaction is bound (``pins_engine``), nor an
        engine the app passed in (``engine=``), which the app disposes.
        """
        engine = self._engine
        if self._factory.pins_engine or engine is None or not self._owns_engine:
            return None
        self._engine = None
        self._default_factory.reset()
        return engine


class Database(BaseDatabase, Generic[_A]):
    """An async engine that lives as long as the app, and a lazy session per request.

    The engine is created when the app starts (``lifespan.startup``) and disposed when
    it stops, or created on first use when the server does not run lifespan.  Inside a
    request, websocket or ``db.scope()``, :attr:`session` is an ``AsyncSession`` that
    is created when first read and checks out a connection at its first statement.
    For synchronous drivers and ``def`` endpoints, see :class:`SyncDatabase`.

    :param url: A URL string or ``sqlalchemy.URL`` with an async driver
        (``postgresql+asyncpg://``, ``postgresql+psycopg://``, ``sqlite+aiosqlite://``);
        ``DATABASE_URL`` from the environment when omitted (and no ``engine`` is given).
    :param engine: A ready ``AsyncEngine`` (yours to dispose), or a zero-argument
        factory returning one (called at startup, disposed at shutdown).
    :param commit_on: ``(status_code) -> bool``, deciding at response start whether the
        request's transaction commits; by default when the status is below 400.
        ``None`` never commits automatically: the app commits explicitly with
        :meth:`commit`, and whatever is left is rolled back.
    :param session_class: The class of the sessions (SQLModel's ``AsyncSession``, say), so
        that the type checker knows it: ``Database(url, session_class=C)`` is a
        ``Database[C]``.  The same as ``session_options={"class_": C}``, which the type
        checker cannot read.
    :param session_options: Keyword arguments for ``async_sessionmaker``; the default
        ``expire_on_commit=False`` keeps loaded objects usable after the commit.  A
        ``class_`` of your own is honoured: the package's guard is mixed in above it.
    :param stats: Track what each request does with this database (statements, time
        in the database, time a connection was held, outcome): see :attr:`stats`.
    :param warn_held_over: Log a warning, naming the route, when a request held a
        connection for longer than this many seconds (turns ``stats`` on).
    :param warn_statements_over: Log a warning when a request sent more statements
        than this (an N+1 query pattern; turns ``stats`` on).
    :param replicas: URLs of read replicas (streaming standbys) of this database, for
        :attr:`read_session`.  Their engines are made with the same ``engine_options``,
        created, checked and disposed with the primary's; one that does not answer at
        startup is logged at WARNING and skipped, not a startup failure.
    :param replica_cooldown: Seconds a replica that failed (no connection, or a dropped
        one) is left out before reads try it again.
    :param password: A zero-argument function returning the password (a ``str``), or an
        ``async def`` one, called for every new connection of the engines the
        ``Database`` creates (the primary's and the replicas'), whose password it
        replaces: rotating credentials (AWS RDS IAM tokens, Vault leases).  Pooled
        connections are not asked again.  A provider that raises fails that connection
        attempt (``sqlalchemy.exc.OperationalError``, the provider's exception as the
        cause), answered 503 with ``Retry-After`` like a database that cannot be
        reached.  Not with a ready ``engine``; with an engine factory, yes.
        See docs/guides/credentials.md.
    :param admission_limit: Load shedding: at most this many requests (HTTP requests,
        websocket rounds) use this database's connections at once.  A request takes a
        place when its session first needs a connection (one place, read session
        included) and gives it back when its sessions end (response start,
        ``db.release()``, the end of the request or round, on every path).  Past the
        limit it waits up to ``admission_timeout``, then gets ``DatabaseBusyError``,
        which the middleware answers with 503 and ``Retry-After``, instead of queueing
        in the pool until ``pool_timeout``.  ``db.scope()`` and ``db.new_session()``
        are not counted.  Usually ``pool_size + max_overflow``: see
        ``docs/guides/load-shedding.md``.
    :param admission_timeout: Seconds a request past ``admission_limit`` waits for a
        place, first come first served, before it is refused; 0 refuses at once.
    :param warn_pool_saturated_for: Log a WARNING, once per episode, when at least
        ``pool_saturated_share`` of the pool's connections (``pool_size +
        max_overflow``) have been checked out for this many seconds, and an INFO when
        the episode ends.  Needs a pool of fixed size (refused with
        ``ConfigurationError`` on ``NullPool``, ``StaticPool``, ``max_overflow=-1``).
    :param pool_saturated_share: The share of the pool, above 0 and at most 1, that
        counts as saturated for ``warn_pool_saturated_for``.
    :param session_per_task: Give each asyncio task that reads :attr:`session` a
        session of its own: child tasks of the request (``gather``, task groups) may
        then use the database at once.  The first task to read it in a request (the
        request's own, usually) keeps the usual session.  Every session is committed
        or rolled back with the request's, but each separately, the request's own
        last: one may commit while another fails (see ``docs/guides/concurrency.md``).  Off
        by default: two tasks using one session at once get
        ``ConcurrentSessionUseError``.
    :param confirm_lost_commits: PostgreSQL only: when the package's COMMIT (at
        response start, ``db.release()``, the end of ``db.scope()``) loses its
        connection, ask the database for up to this many seconds whether it committed
        (``pg_xact_status``), instead of answering 503 in doubt.  Committed: the app's
        response is sent and its on_commit callbacks run; aborted or no answer: 503
        with ``Retry-After``, as without it.  Costs one round trip before each such
        COMMIT, to learn the transaction's id.  A database other than PostgreSQL is
        refused with ``ConfigurationError``.  See docs/guides/failover.md.
    :param engine_options: Passed to ``create_async_engine`` for the engines the
        ``Database`` creates (the URL's and the replicas'), with ``hide_parameters=True``
        unless given: a failed statement's exception (logged when a commit fails)
        then shows the SQL but not its parameters, which are row data (personal data,
        tokens).  ``Database(url, hide_parameters=False)`` shows them again, for
        debugging.  Options SQLAlchemy would refuse, unknown or of the wrong type
        (``pool_size="5"``), are refused here with a ``ConfigurationError``, without
        connecting.

    ``session_options``, and the numbers and flags above, are checked here too, so
    that a mistake fails at import rather than at startup in every worker.
    """

    _engine_type = AsyncEngine
    _maker_type = async_sessionmaker

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        engine: AsyncEngine | Callable[[], AsyncEngine] | None = None,
        commit_on: Callable[[int], bool] | None = commit_below_400,
        session_class: type[_A] | None = None,
        session_options: Mapping[str, Any] | None = None,
        stats: bool = False,
        warn_held_over: float | None = None,
        warn_statements_over: int | None = None,
        replicas: Iterable[str | URL] | None = None,
        replica_cooldown: float = 30.0,
        password: PasswordProvider | None = None,
        admission_limit: int | None = None,
        admission_timeout: float = 0.0,
        warn_pool_saturated_for: float | None = None,
        pool_saturated_share: float = 0.9,
        session_per_task: bool = False,
        confirm_lost_commits: float | None = None,
        **engine_options: Any,
    ) -> None:
        check_bool("session_per_task", session_per_task)
        options = {
            "expire_on_commit": False,
            **check_session_options(with_class(session_options, session_class), sync=False),
        }
        options["class_"] = guarded_class(options.get("class_", AsyncSession))
        super().__init__(
            _engine_source(url, engine, engine_options, sync=False),
            commit_on=commit_on,
            session_options=options,
            stats=stats,
            warn_held_over=warn_held_over,
            warn_statements_over=warn_statements_over,
            password=password,
            admission_limit=admission_limit,
            admission_timeout=admission_timeout,
            warn_pool_saturated_for=warn_pool_saturated_for,
            pool_saturated_share=pool_saturated_share,
            confirm_lost_commits=confirm_lost_commits,
        )
        self._replicas = _replica_set(self, replicas, replica_cooldown)
        self._session_per_task = session_per_task

    @property
    def engine(self) -> AsyncEngine:
        """The ``AsyncEngine``, created now if the app has not started it yet."""
        return cast(AsyncEngine, self._ready_engine())

    @property
    def read_session(self) -> _A:
        """A session for reads that may be served by a read replica.

        Named for what the caller promises (it only reads) rather than where the reads
        go, because that may be the primary: ``db.read_session`` is the request's lazy
        session on a replica (round-robin among those that answer), ended by the
        middleware like :attr:`session` but never committed.  It is :attr:`session`
        itself when the ``Database`` has no replicas, when every replica is down, and
        once the request has written to the primary, so that it reads its own writes.
        Through it, ``SELECT ... FOR UPDATE``, ``get(..., with_for_update=True)`` and
        ORM ``insert``/``update``/``delete`` statements run on :attr:`session`.
        Replicas lag behind the primary: read through :attr:`session` what must be
        current.
        """
        context = SessionContext.current()
        _require_asyncio()
        return cast(_A, context.read_session(self))

    @property
    def session(self) -> _A:
        """The ``AsyncSession`` of the current request, websocket or ``db.scope()``.

        Created on first read; a connection is checked out at its first statement.
        Raises ``NoSessionContextError`` outside any of these, and ``ConfigurationError``
        in a thread without an event loop (a sync ``def`` endpoint), where an
        ``AsyncSession`` cannot be used.
        """
        context = SessionContext.current()
        _require_asyncio()
        return cast(_A, context.session(self))

    async def commit(self) -> None:
        """Commit the current session's transaction now, if there is a session.

        The session stays usable; its next statement begins a new transaction.  Raises
        ``SessionEndedError`` once the request has finished (a task that outlived it):
        its writes were ended with it, and there is nothing this call could commit.
        """
        context = current_context.get()
        session = context.committable(self) if context is not None else None
        if context is not None and session is not None:
            await run_to_completion(commit_one_phase(cast(GuardedSession, session)))
            context.committed_any = True

    async def rollback(self) -> None:
        """Roll back the current session's transaction now, if there is a session."""
        session = self._current_session()
        if session is not None:
            await run_to_completion(cast(GuardedSession, session).rollback())

    async def release(self, *, commit: bool = True) -> None:
        """Commit (or roll back) and close the current session, returning its connection.

        A later read of :attr:`session` opens a new session.  Does nothing when no
        session is open; with ``commit=True``, raises ``SessionEndedError`` once the
        request has finished, as :meth:`commit` does.
        """
        context = current_context.get()
        if context is not None:
            raise_failure(await context.release(self, commit=commit))

    def on_commit(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` after the current transaction commits; never if it rolls back.

        Like Django's ``transaction.on_commit``: for work that must only happen once the
        data is durable (sending a mail, publishing an event, scheduling a background
        job).  ``callback`` takes no arguments and may be a coroutine function.  It runs
        right after the commit, before the response is forwarded, so keep it short or
        have it start the slow work elsewhere.  An exception it raises is logged on the
        ``asgi_sqla`` logger and changes nothing else.
        """
        add_on_commit(self._context_session(), callback)

    def before_commit(self, callback: Callable[[Session], object]) -> None:
        """Call ``callback(session)`` inside the current transaction, just before COMMIT.

        ``session`` is the synchronous ``sqlalchemy.orm.Session`` behind
        :attr:`session` (its ``sync_session``), still usable: read the WAL position
        for read-your-writes on a replica, write an audit row.  It runs however the
        transaction is committed (the middleware, :meth:`commit`, :meth:`release`,
        ``session.commit()``, an ``async with session.begin():`` block), after pending
        ORM changes are flushed; never if it rolls back.  ``callback`` is a plain
        function (SQLAlchemy's ``before_commit`` event is synchronous): its
        ``session.execute()`` goes through the async driver, as in ``run_sync``.  If it
        raises, the commit fails and the transaction rolls back: the client gets a
        500, and the transaction's on_commit callbacks never run.
        """
        check_hook(callback)
        add_before_commit(self._context_session(), callback)

    @asynccontextmanager
    async def scope(
        self, *, commit: bool | None = None, read_only: bool = False, **session_options: Any
    ) -> AsyncIterator[_A]:
        """Make :attr:`session` available outside a request: scripts, workers, tests.

        Commits on normal exit (unless ``commit_on`` is None), rolls back on an
        exception, and always closes the session.  Yields the (lazy) session.

        :param commit: The block's commit policy on normal exit: None follows
            ``commit_on`` (commit, unless it is None); True commits even when it is
            None; False always rolls back.  An exception always rolls back.
        :param read_only: The block's transactions are read-only and never commit, as
            in a ``read_only`` route.  Inside such a route the block is read-only
            whatever is passed.
        :param session_options: ``async_sessionmaker`` keywords for this block's
            session (``expire_on_commit``, ``autoflush``, ``info``, ...), over the
            ``Database``'s own and checked the same way.  Not ``class_`` nor ``bind``:
            those are the ``Database``'s; nor ``pool_timeout``, which SQLAlchemy sets
            per pool, not per checkout.  Reads through ``db.read_session`` keep the
            ``Database``'s options.
        """
        context = self._own_unit("db.scope", commit, read_only, session_options)
        with context.bind():
            async with context.closing(SCOPE_EXITED):
                yield cast(_A, context.session(self))

    @asynccontextmanager
    async def new_session(
        self, *, commit: bool | None = None, read_only: bool = False, **session_options: Any
    ) -> AsyncIterator[_A]:
        """An independent session, with its own connection and transaction.

        For work that runs alongside the request's session, such as concurrent child
        tasks (one session must never be used by two tasks at once).  Commits on
        normal exit (unless ``commit_on`` is None), rolls back on an exception.
        ``commit``, ``read_only`` and ``session_options`` are as for :meth:`scope`;
        inside a ``read_only`` route the session is read-only whatever is passed.
        """
        context = self._own_unit("db.new_session", commit, read_only, session_options)
        async with context.closing(SCOPE_EXITED):
            yield cast(_A, context.session(self))

    def _make_session(self, **options: Any) -> AnySession:
        _require_asyncio()
        return super()._make_session(**options)

    def _make_replica_session(self, engine: AsyncEngine) -> GuardedSession | None:
        _require_asyncio()
        return super()._make_replica_session(engine)

    async def _start(self) -> None:
        """Create the engine and check that the database answers."""
        _require_asyncio()
        engine = self.engine
        try:
            async with engine.connect():
                pass
        except Exception as exc:
            raise self._startup_error(exc, engine) from None
        if self._two_phase_check:
            await _check_two_phase(self, engine)
        replicas = self._replicas
        if replicas is not None:
            for replica in self.replica_engines:
                try:
                    async with replica.connect():
                        pass
                except Exception as exc:  # a replica down is not a startup failure
                    replicas.mark_down(replica, exc)

    async def _stop(self) -> None:
        """Dispose the engines (the middleware calls this at shutdown)."""
        await self.dispose()

    async def dispose(self) -> None:
        """Dispose the engine if this ``Database`` created it, closing pooled connections.

        The middleware calls this at shutdown; call it yourself at the end of a script
        that used :meth:`scope` without the middleware.  A later use creates a new engine.
        Does nothing while a test's transaction is bound (``asgi_sqla.pytest_plugin``).
        """
        if self._factory.pins_engine:
            return
        replicas = self._replicas
        if replicas is not None and replicas.engines is not None:
            replica_engines = replicas.engines
            replicas.reset()
            for replica in replica_engines:
                await run_to_completion(replica.dispose())
        engine = self._forget_engine()
        if engine is not None:
            await run_to_completion(cast(AsyncEngine, engine).dispose())


class _EngineSource(NamedTuple):
    """Where a database's engine comes from: exactly one of the first three."""

    url: URL | None
    engine: AsyncEngine | Engine | None  # the app's own: never disposed by the package
    factory: Callable[[], AsyncEngine | Engine] | None
    options: dict[str, Any]


def _engine_source(
    url: str | URL | None, engine: object, options: dict[str, Any], *, sync: bool
) -> _EngineSource:
    """Check the ``url``, ``engine`` and engine options; say where the engine is."""
    if engine is None:
        checked = _check_driver(_parse_url(url), sync=sync)
        return _EngineSource(checked, None, None, check_engine_options(checked, options, sync=sync))
    if url is not None or options:
        raise ConfigurationError("Pass either a URL (with engine options) or engine=, not both.")
    wanted = Engine if sync else AsyncEngine
    if isinstance(engine, wanted):
        return _EngineSource(None, engine, None, {})
    if isinstance(engine, (Engine, AsyncEngine)):
        raise ConfigurationError(_wrong_engine_message(engine, sync=sync))
    if callable(engine):
        return _EngineSource(None, None, engine, {})
    raise ConfigurationError(
        f"engine= must be an {wanted.__name__} or a function returning one, not "
        f"{type(engine).__name__}."
    )


def _admission(db: BaseDatabase, limit: int | None, timeout: float) -> Admission | None:
    """Check ``admission_limit`` and ``admission_timeout``; the admission, if limited."""
    check_number(
        "admission_limit", limit, "requests", example=10, integer=True, minimum=1, optional=True
    )
    check_number("admission_timeout", timeout, "seconds", example=0.5)
    if limit is None:
        if timeout:
            raise ConfigurationError(
                "admission_timeout is how long a request waits for a place under "
                "admission_limit, and no admission_limit was given: pass both, e.g. "
                "admission_limit=10, admission_timeout=0.5."
            )
        return None
    return Admission(db, int(limit), float(timeout))


def _confirming(db: BaseDatabase, seconds: float | None) -> float | None:
    """Check ``confirm_lost_commits``, and the database, when its URL or engine says it."""
    check_number("confirm_lost_commits", seconds, "seconds", example=5.0, optional=True)
    if seconds is None:
        return None
    if db._url is not None:
        check_confirmable(db._url.get_backend_name())
    elif db._engine is not None:
        check_confirmable(_sync_engine(db._engine).dialect.name)
    return float(seconds)


def _saturation(after: float | None, share: float) -> tuple[float, float] | None:
    """Check ``warn_pool_saturated_for`` and ``pool_saturated_share``: (share, seconds)."""
    check_number("warn_pool_saturated_for", after, "seconds", example=30.0, optional=True)
    check_number("pool_saturated_share", share, "the pool's connections", example=0.9)
    if not 0 < share <= 1:
        raise ConfigurationError(
            f"pool_saturated_share is the share of pool_size + max_overflow checked out "
            f"that counts as saturated, above 0 and at most 1, not {share!r}; pass e.g. "
            "pool_saturated_share=0.9."
        )
    if after is None:
        return None
    return float(share), float(after)


def _limits(held: float | None, statements: int | None) -> tuple[float | None, int | None]:
    """Check the ``warn_*`` thresholds."""
    return (
        check_number("warn_held_over", held, "seconds", example=1.0, optional=True),
        check_number(
            "warn_statements_over",
            statements,
            "statements",
            example=50,
            integer=True,
            optional=True,
        ),
    )


class SessionFactory(Protocol):
    """Where a ``Database``'s sessions come from (the seam the pytest plugin binds)."""

    #: Sessions can be prepared for a two-phase commit.
    can_prepare: bool
    #: The engine must not be disposed while this factory is in use.
    pins_engine: bool

    def make(self, **options: Any) -> AnySession:
        """A new session on the database's primary."""

    def make_read(self, engine: AsyncEngine) -> GuardedSession | None:
        """A new read session on the replica ``engine``; None: read on the primary."""


class EngineSessions:
    """Sessions from the database's own engine: the production factory."""

    can_prepare = True
    pins_engine = False

    def __init__(self, db: BaseDatabase) -> None:
        self._db = db
        self._maker: Callable[..., Any] | None = None
        self._read_maker: async_sessionmaker[GuardedSession] | None = None

    def make(self, **options: Any) -> AnySession:
        maker = self._maker
        if maker is None:
            db = self._db
            maker = self._maker = db._maker_type(db._ready_engine(), **db._session_options)
        session: AnySession = maker(**options)
        return session

    def make_read(self, engine: AsyncEngine) -> GuardedSession:
        maker = self._read_maker
        if maker is None:
            options = dict(self._db._session_options)
            options["class_"] = replica_class(options["class_"])
            maker = self._read_maker = async_sessionmaker(**options)
        return maker(bind=engine)

    def reset(self) -> None:
        """Forget the makers: the engine was disposed, the next one is new."""
        self._maker = self._read_maker = None


def _note_commit(sync_session: Any) -> None:
    # SessionEvents.after_commit: the session's transaction committed, in the task
    # (and so the context) that committed it.  Releasing a SAVEPOINT fires it too.
    if sync_session.in_nested_transaction():
        return
    context = current_context.get()
    if context is not None:
        context.committed_any = True


def with_class(options: Mapping[str, Any] | None, session_class: type[Any] | None) -> object:
    """``session_options`` with ``session_class`` as its ``class_`` (given one way only)."""
    if session_class is None:
        return options
    if options is not None and "class_" in options:
        raise ConfigurationError(
            "The session class was given twice, as session_class= and in "
            "session_options['class_']: pass it once, as session_class=."
        )
    if not isinstance(options, Mapping) and options is not None:
        return options  # check_session_options says what is wrong with it
    return {**(options or {}), "class_": session_class}


def check_hook(callback: object) -> None:
    """Refuse a ``before_commit`` callback that cannot run in SQLAlchemy's event."""
    if not callable(callback):
        raise ConfigurationError(
            f"before_commit() takes a function (session) -> None, not {type(callback).__name__}."
        )
    if inspect.iscoroutinefunction(callback):
        raise ConfigurationError(
            f"before_commit({getattr(callback, '__name__', callback)!r}) was given a "
            "coroutine function, and SQLAlchemy's before_commit event is synchronous: "
            "nothing could await it. Pass a plain function taking the synchronous Session; "
            "its session.execute() goes through the async driver, as in run_sync()."
        )


def raise_failure(outcome: Outcome) -> None:
    """Raise the error of a failed ending (``release()``)."""
    if outcome.error is not None:
        raise outcome.error


def _parse_url(url: str | URL | None) -> URL:
    source = "The URL given to Database()"
    if url is None:
        url = os.environ.get("DATABASE_URL")
        source = "DATABASE_URL"
        if not url:
            raise ConfigurationError(
                "No database URL: pass Database(url) or engine=, or set the DATABASE_URL "
                "environment variable (e.g. postgresql+asyncpg://user:password@host/dbname)."
            )
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        # The parser's message repeats the URL, password included: say it ourselves.
        raise ConfigurationError(
            f"{source} is not a valid SQLAlchemy URL; the expected form is "
            "dialect+driver://user:password@host:port/dbname."
        ) from None


def _check_driver(url: URL, *, sync: bool) -> URL:
    """Refuse a driver of the other kind, or an unknown one, before any driver is imported."""
    shown = mask_url(url)
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise ConfigurationError(
            f"SQLAlchemy knows no dialect and driver {url.drivername!r} (in {shown}); "
            "check the spelling, or install the package that provides it."
        ) from None
    driver = url.get_driver_name()
    if sync and dialect.is_async:
        raise ConfigurationError(
            f"{shown} names an async driver ({driver!r}), and a SyncDatabase needs a "
            "synchronous one (postgresql+psycopg://, postgresql+psycopg2://, sqlite://, "
            "mysql+pymysql://); for async sessions use Database."
        )
    if not sync and not dialect.get_async_dialect_cls(url).is_async:
        raise ConfigurationError(
            f"{_synchronous_driver(url, shown, driver)}; Database needs an async one, "
            "named in the URL (postgresql+asyncpg://, postgresql+psycopg://, "
            "sqlite+aiosqlite://). For synchronous sessions in `def` endpoints, use "
            "SyncDatabase."
        )
    return url


def _synchronous_driver(url: URL, shown: str, driver: str) -> str:
    """What is synchronous about ``url``: its driver, or the default one it got.

    A URL without ``+driver`` gets the dialect's default, which depends on the SQLAlchemy
    release: ``postgresql://`` is psycopg2 on 2.0 and psycopg (async too) on 2.1
    ("Default PostgreSQL driver changed to psycopg", What's New in SQLAlchemy 2.1), so
    the same URL is refused by one and accepted by the other.
    """
    if "+" in url.drivername:
        return f"{shown} names a synchronous driver ({driver!r})"
    return (
        f"{shown} names no driver, and the default of SQLAlchemy {sqlalchemy_version} "
        f"for {url.drivername}:// is a synchronous driver ({driver!r})"
    )


def _replica_set(
    db: BaseDatabase, replicas: Iterable[str | URL] | None, cooldown: float
) -> ReplicaSet | None:
    check_number("replica_cooldown", cooldown, "seconds", example=30.0)
    if replicas is None:
        return None
    if isinstance(replicas, (str, URL)):
        raise ConfigurationError(
            "replicas= takes a list of URLs, e.g. replicas=['postgresql+asyncpg://replica/db']."
        )
    urls = tuple(_check_driver(_parse_url(url), sync=False) for url in replicas)
    return ReplicaSet(db, urls, float(cooldown)) if urls else None


async def _check_two_phase(db: BaseDatabase, engine: AsyncEngine) -> None:
    """Fail startup when the database cannot run PREPARE TRANSACTION."""
    if engine.dialect.name in ("mysql", "mariadb"):
        return  # InnoDB's XA transactions need no setting
    if engine.dialect.name != "postgresql":
        raise DatabaseStartupError(
            f"two_phase=True needs PostgreSQL (PREPARE TRANSACTION), MySQL or MariaDB (XA "
            f"transactions); {db!r} is {engine.dialect.name}."
        )
    async with engine.connect() as connection:
        value = await connection.exec_driver_sql("SHOW max_prepared_transactions")
        allowed = int(value.scalar_one())
    if allowed <= 0:
        raise DatabaseStartupError(
            f"{db!r} cannot take part in two-phase commits (two_phase=True): its server has "
            "max_prepared_transactions = 0. Set it in postgresql.conf to at least the "
            "number of requests that may commit at once (e.g. max_connections) and restart "
            "the server."
        )


def _require_asyncio() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise ConfigurationError(_NOT_ASYNCIO) from None


def _wrong_engine_message(engine: AsyncEngine | Engine, *, sync: bool) -> str:
    if sync:
        return (
            f"{mask_url(engine.url)!r} is an AsyncEngine, and a SyncDatabase needs an Engine: "
            "use sqlalchemy.create_engine() with a synchronous driver, or Database for async "
            "sessions."
        )
    return (
        f"{mask_url(engine.url)!r} is a synchronous Engine, and Database needs an "
        "AsyncEngine: use sqlalchemy.ext.asyncio.create_async_engine() with an async "
        "driver, or SyncDatabase for synchronous sessions."
    )


def _wrong_engine(db: BaseDatabase, engine: object) -> str:
    """Why the engine factory's result cannot serve ``db``."""
    sync = db._engine_type is Engine
    if isinstance(engine, (Engine, AsyncEngine)):
        return _wrong_engine_message(engine, sync=sync)
    wanted = db._engine_type.__name__
    return f"The engine factory returned {type(engine).__name__}, not an {wanted}."


def _sync_engine(engine: AsyncEngine | Engine) -> Engine:
    """The synchronous engine (an ``AsyncEngine``'s ``sync_engine``), where events go."""
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine
