"""``SyncDatabase``: a synchronous engine for the life of the app, a ``Session`` per request."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, cast

from sqlalchemy import URL, Engine
from sqlalchemy.orm import Session, sessionmaker
from typing_extensions import TypeVar

from ._database import (
    BaseDatabase,
    _engine_source,
    check_hook,
    commit_below_400,
    raise_failure,
    with_class,
)
from ._errors import ConfigurationError
from ._options import check_bool, check_session_options
from ._session import (
    add_before_commit,
    add_on_commit,
    run_committed_callbacks_here,
    run_to_completion,
)
from ._threaded import ThreadSession, check_off_loop, in_worker, thread_class
from ._unit import SCOPE_EXITED, SessionContext, current_context, run_here

__all__ = ["SyncDatabase"]

#: The session class: ``Session``, or the one given as ``session_class``.
_S = TypeVar("_S", bound=Session, default=Session, covariant=True)


class SyncDatabase(BaseDatabase, Generic[_S]):
    """A synchronous engine that lives as long as the app, and a lazy ``Session`` per request.

    For synchronous drivers and the ``def`` endpoints and dependencies that frameworks
    run in worker threads: FastAPI's SQL tutorial, SQLModel, Flask-style code.  Inside a
    request, websocket or ``db.scope()``, :attr:`session` is a ``sqlalchemy.orm.Session``
    (of ``session_options["class_"]``, ``sqlmodel.Session`` say) created when first read,
    which checks out a connection at its first statement.  The middleware commits or
    rolls it back before the status line is sent, as for an async ``Database``, in a
    worker thread under a thread limit of its own: the event loop never waits for the
    database, and the commit never waits for the framework's threads.

    A session's calls from the event loop's thread (an ``async def`` endpoint) raise
    ``BlockingCallError``: they would stop every other request while they wait.  A call
    while another thread is inside one on the same session raises
    ``ConcurrentSessionUseError``.  An app can use a ``Database`` and a
    ``SyncDatabase`` side by side, and pass both to the middleware.

    :param url: A URL string or ``sqlalchemy.URL`` with a synchronous driver
        (``postgresql+psycopg://``, ``postgresql+psycopg2://``, ``sqlite:///file.db``,
        ``mysql+pymysql://``); ``DATABASE_URL`` from the environment when omitted.
    :param engine: A ready ``Engine`` (yours to dispose), or a zero-argument factory
        returning one (called at startup, disposed at shutdown).
    :param session_class: The class of the sessions (``sqlmodel.Session``, say), so that
        the type checker knows it: ``SyncDatabase(url, session_class=sqlmodel.Session)``
        is a ``SyncDatabase[sqlmodel.Session]``, whose ``db.session.exec()`` checks.
        The same as ``session_options={"class_": ...}``, which the type checker cannot
        read.
    :param block_event_loop: Allow the sessions' calls from the event loop's thread.
        For tests and tools on SQLite, where a call takes microseconds; never for a
        server that talks to a database over the network.
    :param password: A zero-argument function returning the password (a ``str``), called
        in the connecting thread for every new connection, as for :class:`Database`;
        not an ``async def`` one, which nothing here could await.

    ``commit_on``, ``session_options`` (keywords of ``sessionmaker``), ``stats``,
    ``warn_held_over``, ``warn_statements_over``, ``admission_limit``,
    ``admission_timeout``, ``warn_pool_saturated_for``, ``pool_saturated_share``,
    ``confirm_lost_commits`` and ``engine_options`` (passed to ``create_engine``) are
    as for :class:`Database`, and checked here the same way.  A request past
    ``admission_limit`` waits for its place in its worker thread (in the event loop's
    thread, with ``block_event_loop``, it is refused at once: nothing could free a
    place while it blocked the loop).  Read replicas, two-phase commit and
    ``session_per_task`` are for async databases only.
    """

    _engine_type = Engine
    _maker_type = sessionmaker

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        engine: Engine | Callable[[], Engine] | None = None,
        commit_on: Callable[[int], bool] | None = commit_below_400,
        session_class: type[_S] | None = None,
        session_options: Mapping[str, Any] | None = None,
        stats: bool = False,
        warn_held_over: float | None = None,
        warn_statements_over: int | None = None,
        block_event_loop: bool = False,
        password: Callable[[], str] | None = None,
        admission_limit: int | None = None,
        admission_timeout: float = 0.0,
        warn_pool_saturated_for: float | None = None,
        pool_saturated_share: float = 0.9,
        confirm_lost_commits: float | None = None,
        **engine_options: Any,
    ) -> None:
        check_bool("block_event_loop", block_event_loop)
        if "replicas" in engine_options:
            raise ConfigurationError(
                "Read replicas are supported by the async Database only; a SyncDatabase "
                "reads and writes through its one engine."
            )
        if "session_per_task" in engine_options:
            raise ConfigurationError(
                "session_per_task is for the async Database: a request's `def` code may run "
                "in several of the framework's threads, so a session per thread would "
                "split one request's work unpredictably. Give the app's own threads a "
                "session each with `with db.new_session() as session:`."
            )
        options = {
            "expire_on_commit": False,
            **check_session_options(with_class(session_options, session_class), sync=True),
        }
        options["class_"] = thread_class(options.get("class_", Session), block_event_loop)
        super().__init__(
            _engine_source(url, engine, engine_options, sync=True),
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
        self._block_event_loop = block_event_loop

    @property
    def engine(self) -> Engine:
        """The ``Engine``, created now if the app has not started it yet."""
        return cast(Engine, self._ready_engine())

    @property
    def session(self) -> _S:
        """The ``Session`` of the current request, websocket or ``db.scope()``.

        Created on first read (anywhere, the event loop's thread included: that takes
        no connection); a connection is checked out at its first statement.  Raises
        ``NoSessionContextError`` outside a request, websocket or ``db.scope()``.
        """
        return cast(_S, SessionContext.current().session(self))

    def commit(self) -> None:
        """Commit the current session's transaction now, if there is a session.

        The session stays usable; its next statement begins a new transaction.  The
        on_commit callbacks of the transaction run here, after the commit.  Raises
        ``SessionEndedError`` once the request has finished (a thread that outlived a
        cancelled request): its writes were ended with it, and there is nothing this
        call could commit.
        """
        context = current_context.get()
        session = context.committable(self) if context is not None else None
        if context is not None and session is not None:
            thread_session = cast(ThreadSession, session)
            thread_session.commit()
            context.committed_any = True
            run_committed_callbacks_here(thread_session)

    def rollback(self) -> None:
        """Roll back the current session's transaction now, if there is a session."""
        session = self._current_session()
        if session is not None:
            cast(ThreadSession, session).rollback()

    def release(self, *, commit: bool = True) -> None:
        """Commit (or roll back) and close the current session, returning its connection.

        A later read of :attr:`session` opens a new session.  Does nothing when no
        session is open; with ``commit=True``, raises ``SessionEndedError`` once the
        request has finished, as :meth:`commit` does.  Runs in the calling thread (a
        worker thread: not the event loop's).
        """
        context = current_context.get()
        if context is None:
            return
        session = context.committable(self) if commit else context.existing(self)
        if session is not None:
            check_off_loop(self._block_event_loop)
            raise_failure(run_here(context.release(self, commit=commit, here=True)))

    def on_commit(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` after the current transaction commits; never if it rolls back.

        As :meth:`Database.on_commit`, except that ``callback`` is a plain function: it
        runs in the thread that committed (a worker thread), where nothing can await.
        """
        if inspect.iscoroutinefunction(callback):
            raise ConfigurationError(
                f"on_commit({callback.__name__}) was given a coroutine function, and a "
                "SyncDatabase runs callbacks in a worker thread, where nothing can await "
                "it: pass a plain function."
            )
        add_on_commit(self._context_session(), callback)

    def before_commit(self, callback: Callable[[Session], object]) -> None:
        """Call ``callback(session)`` inside the current transaction, just before COMMIT.

        As :meth:`Database.before_commit`: ``session`` is :attr:`session` itself, and
        the callback runs in the thread that commits.
        """
        check_hook(callback)
        add_before_commit(self._context_session(), callback)

    @contextmanager
    def scope(
        self, *, commit: bool | None = None, read_only: bool = False, **session_options: Any
    ) -> Iterator[_S]:
        """Make :attr:`session` available outside a request: scripts, workers, tests.

        Commits on normal exit (unless ``commit_on`` is None), rolls back on an
        exception, and always closes the session, in the calling thread.  Yields the
        (lazy) session.  ``commit``, ``read_only`` and ``session_options``
        (``sessionmaker`` keywords) are as for :meth:`Database.scope`; inside a
        ``read_only`` route the block is read-only whatever is passed.
        """
        check_off_loop(self._block_event_loop)
        context = self._own_unit("db.scope", commit, read_only, session_options)
        with context.bind(), context.closing_here(SCOPE_EXITED):
            yield cast(_S, context.session(self))

    @contextmanager
    def new_session(
        self, *, commit: bool | None = None, read_only: bool = False, **session_options: Any
    ) -> Iterator[_S]:
        """An independent session, with its own connection and transaction.

        For work that runs alongside the request's session, such as a thread pool of
        the app's own (one session must never be used by two threads at once).
        Commits on normal exit (unless ``commit_on`` is None), rolls back on an
        exception.  ``commit``, ``read_only`` and ``session_options`` are as for
        :meth:`scope`; inside a ``read_only`` route it is read-only whatever is passed.
        """
        check_off_loop(self._block_event_loop)
        context = self._own_unit("db.new_session", commit, read_only, session_options)
        with context.closing_here(SCOPE_EXITED):
            yield cast(_S, context.session(self))

    def _check_answers(self) -> None:
        engine = self.engine
        try:
            with engine.connect():
                pass
        except Exception as exc:
            raise self._startup_error(exc, engine) from None

    async def _start(self) -> None:
        """Create the engine and check that the database answers, in a worker thread."""
        await in_worker(self._check_answers)

    async def _stop(self) -> None:
        """Dispose the engine in a worker thread (the middleware calls this at shutdown)."""
        await run_to_completion(in_worker(self.dispose))

    def dispose(self) -> None:
        """Dispose the engine if this ``SyncDatabase`` created it, closing pooled connections.

        The middleware calls this at shutdown; call it yourself at the end of a script
        that used :meth:`scope` without the middleware.  A later use creates a new engine.
        """
        engine = self._forget_engine()
        if engine is not None:
            cast(Engine, engine).dispose()
