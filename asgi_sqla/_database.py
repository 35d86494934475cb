"""``Database``: one engine for the life of the app, one lazy session per request."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, NamedTuple, Protocol

from sqlalchemy import URL, Engine, event, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
)
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine

from ._errors import ConfigurationError, DatabaseStartupError
from ._multidb import commit_one_phase
from ._options import check_bool, check_engine_options, check_number, check_session_options
from ._outcome import Outcome
from ._replicas import ReplicaSet, replica_class, track_writes
from ._secrets import mask_text, mask_url
from ._session import (
    ROLLBACK_ONLY,
    GuardedSession,
    add_on_commit,
    guarded_class,
    run_to_completion,
)
from ._stats import Limits, PoolStatus, RequestStats, instrument, pool_status
from ._unit import SCOPE_EXITED, SessionContext, current_context

__all__ = ["Database", "commit_below_400"]

#: The pip extra (``pip install 'asgi-sqla[NAME]'``) that installs each async driver.
_DRIVER_EXTRAS = {
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
    "cannot be used: make it `async def`. Under trio, SQLAlchemy's async drivers cannot "
    "run: serve the app on asyncio (uvicorn does; hypercorn needs --worker-class asyncio)."
)


def commit_below_400(status: int) -> bool:
    """The default ``commit_on`` policy: commit when the status is below 400."""
    return status < 400


class Database:
    """An async engine that lives as long as the app, and a lazy session per request.

    The engine is created when the app starts (``lifespan.startup``) and disposed when
    it stops, or created on first use when the server does not run lifespan.  Inside a
    request, websocket or ``db.scope()``, :attr:`session` is an ``AsyncSession`` that
    is created when first read and checks out a connection at its first statement.

    :param url: A URL string or ``sqlalchemy.URL``; ``DATABASE_URL`` from the
        environment when omitted (and no ``engine`` is given).
    :param engine: A ready ``AsyncEngine`` (yours to dispose), or a zero-argument
        factory returning one (called at startup, disposed at shutdown).
    :param commit_on: ``(status_code) -> bool``, deciding at response start whether the
        request's transaction commits; by default when the status is below 400.
        ``None`` never commits automatically: the app commits explicitly with
        :meth:`commit`, and whatever is left is rolled back.
    :param session_options: Keyword arguments for ``async_sessionmaker``; the default
        ``expire_on_commit=False`` keeps loaded objects usable after the commit.
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

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        engine: AsyncEngine | Callable[[], AsyncEngine] | None = None,
        commit_on: Callable[[int], bool] | None = commit_below_400,
        session_options: Mapping[str, Any] | None = None,
        stats: bool = False,
        warn_held_over: float | None = None,
        warn_statements_over: int | None = None,
        replicas: Iterable[str | URL] | None = None,
        replica_cooldown: float = 30.0,
        **engine_options: Any,
    ) -> None:
        self._warn_held, self._warn_statements = _limits(warn_held_over, warn_statements_over)
        check_bool("stats", stats)
        self._stats = stats or warn_held_over is not None or warn_statements_over is not None
        self._instrumented: AsyncEngine | None = None
        source = _engine_source(url, engine, engine_options)
        self._url, self._engine, self._engine_factory, engine_options = source
        self._owns_engine = self._engine is None
        if commit_on is not None and not callable(commit_on):
            raise ConfigurationError(
                "commit_on must be a function (status_code) -> bool, or None to never "
                "commit automatically."
            )
        self._commit_on = commit_on
        self._engine_options = engine_options
        options = {"expire_on_commit": False, **check_session_options(session_options)}
        options["class_"] = guarded_class(options.get("class_", AsyncSession))
        self._session_options = options
        #: Where sessions come from: the engine's pool, or a test's connection (the
        #: pytest plugin swaps it with :meth:`_sessions_from`).
        self._factory: SessionFactory = EngineSessions(self)
        self._default_factory = self._factory
        self._replicas = _replica_set(self, replicas, replica_cooldown)
        self._writes_tracked: AsyncEngine | None = None
        #: Set by a middleware with ``retry=`` routes: every commit of a session is
        #: noted in the request's unit of work, which is then never re-run.
        self._track_commits = False
        #: Set by a middleware with ``two_phase=True``: startup checks the server allows it.
        self._two_phase_check = False

    def __repr__(self) -> str:
        if self._url is not None:
            target = mask_url(self._url)
        elif self._engine is not None:
            target = mask_url(self._engine.url)
        else:
            target = "engine factory"
        return f"Database({target!r})"

    @property
    def engine(self) -> AsyncEngine:
        """The ``AsyncEngine``, created now if the app has not started it yet."""
        engine = self._engine
        if engine is None:
            engine = self._engine = self._create_engine()
        if self._stats and self._instrumented is not engine:
            instrument(engine, self._current_stats)
            self._instrumented = engine
        if self._replicas is not None and self._writes_tracked is not engine:
            track_writes(engine, self._note_write)  # read-your-writes
            self._writes_tracked = engine
        return engine

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
            engines = replicas.engines = tuple(self._engine_for(url) for url in replicas.urls)
        return engines

    @property
    def read_session(self) -> AsyncSession:
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
        return context.read_session(self)

    @property
    def stats(self) -> RequestStats | None:
        """What the current request has done with this database so far.

        ``None`` unless the ``Database`` tracks statistics (``stats=True``, or a
        ``warn_*`` threshold, or the middleware's ``server_timing``), or outside a
        request, websocket or ``db.scope()``.
        """
        context = current_context.get()
        if not self._stats or context is None:
            return None
        return context.stats(self)

    def pool_status(self) -> PoolStatus:
        """Size, checked-out, idle and overflow connections of the pool, right now."""
        return pool_status(self.engine)

    def _track_stats(self) -> None:
        """Turn statistics on (the middleware does, for ``server_timing``)."""
        self._stats = True
        if self._engine is not None:
            self.engine  # noqa: B018 -- instruments the engine made before this call

    @property
    def limits(self) -> Limits:
        """The warning thresholds (``warn_held_over``, ``warn_statements_over``)."""
        return Limits(self._warn_held, self._warn_statements)

    @property
    def commit_on(self) -> Callable[[int], bool] | None:
        """The policy deciding from a status whether a request commits (None: never)."""
        return self._commit_on

    @property
    def session(self) -> AsyncSession:
        """The ``AsyncSession`` of the current request, websocket or ``db.scope()``.

        Created on first read; a connection is checked out at its first statement.
        Raises ``NoSessionContextError`` outside any of these, and ``ConfigurationError``
        in a thread without an event loop (a sync ``def`` endpoint), where an
        ``AsyncSession`` cannot be used.
        """
        context = SessionContext.current()
        _require_asyncio()
        return context.session(self)

    async def commit(self) -> None:
        """Commit the current session's transaction now, if there is a session.

        The session stays usable; its next statement begins a new transaction.
        """
        context = current_context.get()
        session = context.existing(self) if context is not None else None
        if context is not None and session is not None:
            await run_to_completion(commit_one_phase(session))
            context.committed_any = True

    async def rollback(self) -> None:
        """Roll back the current session's transaction now, if there is a session."""
        session = self._current_session()
        if session is not None:
            await run_to_completion(session.rollback())

    async def release(self, *, commit: bool = True) -> None:
        """Commit (or roll back) and close the current session, returning its connection.

        A later read of :attr:`session` opens a new session.  Does nothing when no
        session is open.
        """
        context = current_context.get()
        if context is not None:
            _raise_failure(await context.release(self, commit=commit))

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

    def set_rollback_only(self) -> None:
        """Mark the current transaction so that it rolls back, whatever the status.

        The automatic end of the request then rolls back even a 2xx, on_commit callbacks
        are dropped, and every commit of the session raises ``RollbackOnlyError``:
        ``commit()``, the end of an ``async with session.begin():`` block, a commit in
        ``run_sync``.  The mark ends with the session (after :meth:`release`, a new
        session starts unmarked).
        """
        self._context_session()._asgi_sqla_rollback_only = ROLLBACK_ONLY

    @asynccontextmanager
    async def scope(self) -> AsyncIterator[AsyncSession]:
        """Make :attr:`session` available outside a request: scripts, workers, tests.

        Commits on normal exit (unless ``commit_on`` is None), rolls back on an
        exception, and always closes the session.  Yields the (lazy) session.  Inside
        a ``read_only`` route the block is read-only too.
        """
        context = self._own_unit()
        with context.bind():
            async with context.closing(SCOPE_EXITED):
                yield context.session(self)

    @asynccontextmanager
    async def new_session(self) -> AsyncIterator[AsyncSession]:
        """An independent session, with its own connection and transaction.

        For work that runs alongside the request's session, such as concurrent child
        tasks (one session must never be used by two tasks at once).  Commits on
        normal exit (unless ``commit_on`` is None), rolls back on an exception.  Inside
        a ``read_only`` route it is read-only too.
        """
        context = self._own_unit()
        async with context.closing(SCOPE_EXITED):
            yield context.session(self)

    def _own_unit(self) -> SessionContext:
        """A unit of work of this database alone, read-only inside a read-only route."""
        unit = SessionContext((self,))
        enclosing = current_context.get()
        if enclosing is not None and enclosing.read_only:
            unit.read_only = True
        return unit

    def _context_session(self) -> GuardedSession:
        """The current context's session object (no connection is taken for it)."""
        return SessionContext.current().session(self)

    def _current_session(self) -> GuardedSession | None:
        context = current_context.get()
        return context.existing(self) if context is not None else None

    def _make_session(self, **options: Any) -> GuardedSession:
        _require_asyncio()
        session = self._factory.make(**options)
        if self._track_commits:
            event.listen(session.sync_session, "after_commit", _note_commit)
        return session

    def _make_replica_session(self, engine: AsyncEngine) -> GuardedSession | None:
        """A read session bound to the replica ``engine`` (routing: ``_replicas``)."""
        _require_asyncio()
        return self._factory.make_read(engine)

    def _can_prepare(self) -> bool:
        """Whether this database's sessions can take part in a two-phase commit."""
        return self._factory.can_prepare

    @contextmanager
    def _sessions_from(self, factory: SessionFactory) -> Iterator[None]:
        """Make the sessions opened in the block with ``factory`` (the pytest plugin's).

        While it lasts, :meth:`dispose` leaves the engine alone when the factory
        ``pins_engine``: a test's connection is still open on it.
        """
        if self._factory is not self._default_factory:
            raise ConfigurationError(f"{self!r} is already bound to a test's transaction.")
        self._factory = factory
        try:
            yield
        finally:
            self._factory = self._default_factory

    def _create_engine(self) -> AsyncEngine:
        if self._engine_factory is not None:
            engine = self._engine_factory()
            if isinstance(engine, Engine):
                raise ConfigurationError(_sync_engine_message(engine))
            if not isinstance(engine, AsyncEngine):
                raise ConfigurationError(
                    f"The engine factory returned {type(engine).__name__}, not an AsyncEngine."
                )
            return engine
        url = self._url
        assert url is not None  # either a URL, an engine or a factory was given
        return self._engine_for(url)

    def _engine_for(self, url: URL) -> AsyncEngine:
        """An engine the package owns, for ``url`` (the primary's or a replica's)."""
        # A failed statement's exception shows its parameters, row data, and it is
        # logged when a commit fails: hidden unless the app asks for them.
        options = {"hide_parameters": True, **self._engine_options}
        try:
            return _create_async_engine(url, **options)
        except ImportError as exc:
            driver = url.get_driver_name()
            extra = _DRIVER_EXTRAS.get(driver)
            fix = (
                f"pip install 'asgi-sqla[{extra}]'"
                if extra
                else f"install the {driver!r} driver, or use an async one"
            )
            raise ConfigurationError(
                f"The driver for {mask_url(url)} could not be loaded "
                f"({mask_text(str(exc), url)}): {fix}."
            ) from None

    async def _start(self) -> None:
        """Create the engine and check that the database answers."""
        _require_asyncio()
        engine = self.engine
        try:
            async with engine.connect():
                pass
        except Exception as exc:
            raise DatabaseStartupError(
                f"{self!r} did not answer at startup: "
                f"{type(exc).__name__}: {mask_text(str(exc), engine.url)}"
            ) from None
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
        engine = self._engine
        if engine is None or not self._owns_engine:
            return
        self._engine = None
        self._default_factory.reset()
        await run_to_completion(engine.dispose())


class _EngineSource(NamedTuple):
    """Where a ``Database``'s engine comes from: exactly one of the first three."""

    url: URL | None
    engine: AsyncEngine | None  # the app's own: never disposed by the package
    factory: Callable[[], AsyncEngine] | None
    options: dict[str, Any]


def _engine_source(
    url: str | URL | None,
    engine: AsyncEngine | Callable[[], AsyncEngine] | None,
    options: dict[str, Any],
) -> _EngineSource:
    """Check ``Database``'s ``url``, ``engine`` and engine options; say where the engine is."""
    if engine is None:
        checked = _check_async_driver(_parse_url(url))
        return _EngineSource(checked, None, None, check_engine_options(checked, options))
    if url is not None or options:
        raise ConfigurationError("Pass either a URL (with engine options) or engine=, not both.")
    if isinstance(engine, AsyncEngine):
        return _EngineSource(None, engine, None, {})
    if isinstance(engine, Engine):
        raise ConfigurationError(_sync_engine_message(engine))
    if callable(engine):
        return _EngineSource(None, None, engine, {})
    raise ConfigurationError(
        f"engine= must be an AsyncEngine or a function returning one, not {type(engine).__name__}."
    )


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

    def make(self, **options: Any) -> GuardedSession:
        """A new session on the database's primary."""

    def make_read(self, engine: AsyncEngine) -> GuardedSession | None:
        """A new read session on the replica ``engine``; None: read on the primary."""


class EngineSessions:
    """Sessions from the database's own engine: the production factory."""

    can_prepare = True
    pins_engine = False

    def __init__(self, db: Database) -> None:
        self._db = db
        self._maker: async_sessionmaker[GuardedSession] | None = None
        self._read_maker: async_sessionmaker[GuardedSession] | None = None

    def make(self, **options: Any) -> GuardedSession:
        maker = self._maker
        if maker is None:
            db = self._db
            maker = self._maker = async_sessionmaker(db.engine, **db._session_options)
        return maker(**options)

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


def _raise_failure(outcome: Outcome) -> None:
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


def _check_async_driver(url: URL) -> URL:
    """Refuse a synchronous or unknown driver now, before any driver is imported."""
    shown = mask_url(url)
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise ConfigurationError(
            f"SQLAlchemy knows no dialect and driver {url.drivername!r} (in {shown}); "
            "check the spelling, or install the package that provides it."
        ) from None
    if not dialect.get_async_dialect_cls(url).is_async:
        raise ConfigurationError(
            f"{shown} names a synchronous driver ({url.get_driver_name()!r}); asgi_sqla "
            "needs an async one, e.g. postgresql+asyncpg://, postgresql+psycopg:// or "
            "sqlite+aiosqlite://."
        )
    return url


def _replica_set(
    db: Database, replicas: Iterable[str | URL] | None, cooldown: float
) -> ReplicaSet | None:
    check_number("replica_cooldown", cooldown, "seconds", example=30.0)
    if replicas is None:
        return None
    if isinstance(replicas, (str, URL)):
        raise ConfigurationError(
            "replicas= takes a list of URLs, e.g. replicas=['postgresql+asyncpg://replica/db']."
        )
    urls = tuple(_check_async_driver(_parse_url(url)) for url in replicas)
    return ReplicaSet(db, urls, float(cooldown)) if urls else None


async def _check_two_phase(db: Database, engine: AsyncEngine) -> None:
    """Fail startup when the database cannot run PREPARE TRANSACTION."""
    if engine.dialect.name != "postgresql":
        raise DatabaseStartupError(
            f"two_phase=True needs PostgreSQL (PREPARE TRANSACTION); {db!r} is "
            f"{engine.dialect.name}."
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


def _sync_engine_message(engine: Engine) -> str:
    return (
        f"{mask_url(engine.url)!r} is a synchronous Engine; "
        "asgi_sqla needs an AsyncEngine: use sqlalchemy.ext.asyncio.create_async_engine() "
        "with an async driver."
    )
