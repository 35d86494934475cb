"""``SQLAlchemyMiddleware``: the pure ASGI middleware.

It keeps the configuration and dispatches each connection to a small responder
(``_http``, ``_websocket``, ``_retry``, ``_lifespan``) that composes the connection's
unit of work (``_unit``); scope types it does not handle pass straight through.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from asgiref.compatibility import guarantee_single_callable
from sqlalchemy.ext.asyncio import AsyncEngine

from ._database import BaseDatabase
from ._errors import ConfigurationError
from ._http import HTTPOptions, HTTPResponder
from ._lifespan import LifespanRelay
from ._options import check_bool, check_number
from ._retry import RetryPolicy, serve_retrying
from ._routes import PathPatterns
from ._stats import report
from ._unit import REQUEST_FINISHED, SCOPE_KEY, SessionContext, current_context
from ._websocket import WebSocketResponder
from .types import AnyASGIApp, ASGIApp, Receive, Scope, Send

__all__ = ["SQLAlchemyMiddleware"]


class SQLAlchemyMiddleware:
    """Wraps an ASGI app so that each connection gets lazy sessions of ``databases``.

    * ``lifespan``: engines are created and checked at startup, disposed at shutdown;
      the app's own lifespan runs in between.
    * ``http``: sessions opened by the request are committed (``commit_on(status)``)
      or rolled back, and closed, *before* ``http.response.start`` is forwarded.  If
      the commit fails the client gets a 500 instead.
    * ``websocket``: open sessions are committed and closed whenever the app waits in
      ``receive()``, and at close; rolled back if the app raises.
    * Any other scope type passes through untouched.

    :param retry_after: When a request failed because the database was unavailable
        (the pool timed out, its ``admission_limit`` refused it, the connection was
        lost or refused, the server turned read-only: see ``_unavailable``) and its
        response has not started, the client gets 503 with this ``Retry-After``
        instead of a 500, whether the exception reaches the middleware, the app's
        framework turned it into a 5xx response, or the COMMIT at response start failed
        so.  Each such 503 is logged at WARNING, at most once a second for each reason
        (the next line counts those left out).
    :param read_only: Path patterns (``/reports/*``) whose transactions are read-only
        and never commit (``READ ONLY`` on PostgreSQL, MySQL and MariaDB).  These
        patterns, like those of ``manual_commit`` and ``retry``, match every spelling of a
        path that frameworks route alike: repeated slashes merged, a trailing slash
        ignored, with and without ``root_path``; ``read_only`` and ``manual_commit`` in
        any letter case too (BlackSheep routes so), ``retry`` only as written.  A request
        without a ``path`` is read-only (and manual-commit) when such patterns are given,
        and never retried.
    :param manual_commit: Path patterns whose transactions never commit automatically:
        the handler calls ``db.commit()``; the rest is rolled back.
    :param retry: Path patterns whose requests are re-run from the start, up to
        ``retry_attempts`` times with jittered backoff (``retry_backoff`` seconds,
        doubling), when a serialization failure or deadlock happens before the
        response started and the request body was read in full and is at most
        ``retry_body_limit`` bytes.  Only for handlers that are safe to run again.
    :param server_timing: Add a ``Server-Timing: db;dur=...;desc="N queries"`` header
        to responses of requests that used a database, so browsers' developer tools
        show it; turns statistics on for the databases (see ``Database(stats=...)``).
    :param two_phase: When a request wrote to more than one database, commit them with
        two-phase commit (PostgreSQL ``PREPARE TRANSACTION`` / ``COMMIT PREPARED``,
        MySQL and MariaDB ``XA PREPARE`` / ``XA COMMIT``): all or none.  Every database
        must be PostgreSQL with ``max_prepared_transactions`` above 0 (checked at
        startup), MySQL or MariaDB.  Without it the databases commit one after the
        other, in the order the request first used them.
    :param autocommit_reads: Path patterns of routes that only read, whose sessions
        run each statement in autocommit: no ``BEGIN`` nor ``COMMIT``, one round trip
        per statement, and each statement sees its own snapshot (two statements may
        see different data).  They are read-only as ``read_only=`` routes are, and a
        write is refused before it is sent.  A request without a ``path`` is read-only
        but keeps its transaction.  See docs/guides/autocommit-reads.md.
    """

    def __init__(
        self,
        app: AnyASGIApp,
        *databases: BaseDatabase,
        retry_after: int = 1,
        read_only: Iterable[str] = (),
        manual_commit: Iterable[str] = (),
        retry: Iterable[str] = (),
        retry_attempts: int = 3,
        retry_body_limit: int = 64 * 1024,
        retry_backoff: float = 0.01,
        server_timing: bool = False,
        two_phase: bool = False,
        autocommit_reads: Iterable[str] = (),
    ) -> None:
        _check_databases(databases)
        # Retry-After takes whole seconds (RFC 9110, section 10.2.3).
        check_number("retry_after", retry_after, "seconds", example=1, integer=True)
        self._retry_policy = RetryPolicy.checked(retry_attempts, retry_body_limit, retry_backoff)
        check_bool("server_timing", server_timing)
        # An ASGI 2 (double-callable) app is adapted once here, not per request.
        self.app = cast(ASGIApp, guarantee_single_callable(app))  # type: ignore[no-untyped-call]
        self.databases = databases
        self.retry_after = retry_after
        self._http = HTTPOptions((b"retry-after", str(retry_after).encode()), server_timing)
        self._read_only = PathPatterns("read_only", read_only)
        self._autocommit_reads = PathPatterns("autocommit_reads", autocommit_reads)
        if self._autocommit_reads:  # autocommit routes are read-only routes too
            self._read_only = PathPatterns(
                "read_only", (*self._read_only.patterns, *self._autocommit_reads.patterns)
            )
        self._manual_commit = PathPatterns("manual_commit", manual_commit)
        self._retry = PathPatterns("retry", retry)
        self._has_routes = bool(self._read_only or self._manual_commit or self._retry)
        if server_timing:
            for db in databases:
                db._track_stats()
        if self._retry:
            for db in databases:
                db._track_commits = True  # a request that committed is never re-run
        self._two_phase = _check_two_phase(two_phase, databases)
        #: Some database has an ``admission_limit``: this middleware's units count.
        self._counted = any(db._admission is not None for db in databases)
        #: Some database is a SyncDatabase: its sessions open in worker threads.
        self._threaded = any(db._engine_type is not AsyncEngine for db in databases)
        #: A unit needs nothing beyond its databases (see ``_unit``): the common case.
        self._plain = not (self._has_routes or self._two_phase or self._counted or self._threaded)

    # Any-typed so that the middleware can stand wherever a framework's own ASGI type
    # is expected (``app.asgi_app = SQLAlchemyMiddleware(...)`` in Quart).
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        scope_type = scope["type"]
        if scope_type == "http":
            if self._plain:  # the hot path: every request of most apps
                unit = SessionContext(self.databases)
                unit.threaded = False
                await self._serve(scope, HTTPResponder(unit, receive, send, self._http))
            elif self._has_routes and self._retry.match(scope):
                await serve_retrying(
                    scope,
                    receive,
                    self._retry_policy,
                    lambda attempt_scope, attempt_receive: self._http_responder(
                        attempt_scope, attempt_receive, send
                    ),
                    self._serve,
                )
            else:
                await self._serve(
                    scope, HTTPResponder(self._unit(scope), receive, send, self._http)
                )
        elif scope_type == "websocket":
            await self._serve(scope, WebSocketResponder(self._unit(scope), receive, send))
        elif scope_type == "lifespan":
            await LifespanRelay(self.app, self.databases, scope, receive, send).run()
        else:
            await self.app(scope, receive, send)

    def _unit(self, scope: Scope) -> SessionContext:
        """A new unit of work for a connection, with its route's policies."""
        unit = SessionContext(self.databases)
        if self._has_routes:
            unit.read_only = self._read_only.match(scope)
            if self._autocommit_reads:
                unit.autocommit = self._autocommit_reads.match(scope)
            unit.manual = self._manual_commit.match(scope)
        if self._two_phase:
            unit.two_phase = True
        if self._counted:
            unit.counted = True
        if not self._threaded:
            unit.threaded = False
        return unit

    def _http_responder(self, scope: Scope, receive: Receive, send: Send) -> HTTPResponder:
        return HTTPResponder(self._unit(scope), receive, send, self._http)

    async def _serve(self, scope: Scope, responder: HTTPResponder | WebSocketResponder) -> None:
        """Run the app for one connection with its unit bound, then end what is open.

        This is the per-request hot path: a request that reads no session pays for
        one small object and a contextvar set/reset, nothing more.
        """
        unit = responder.unit
        scope[SCOPE_KEY] = unit
        token = current_context.set(unit)
        try:
            await self.app(scope, responder.receive, responder.send)
        except Exception as exc:
            if not await responder.app_raised(exc):
                raise
        except BaseException:  # cancellation: roll back, shielded, and let it propagate
            if unit.has_sessions:
                await unit.close(reason=REQUEST_FINISHED, failed=True)
            raise
        else:
            if unit._sessions or responder.retrying:
                await responder.app_returned()
        finally:
            try:
                if not unit.close_unused(REQUEST_FINISHED):
                    # A thread of the app opened a session after the app returned: that
                    # work belongs to no response, so it is rolled back.
                    await unit.close(reason=REQUEST_FINISHED, failed=True)
            finally:
                current_context.reset(token)
                if unit._stats is not None:
                    report(scope, [(db, db.limits, s) for db, s in unit.all_stats().items()])


def _check_databases(databases: tuple[object, ...]) -> None:
    if not databases:
        raise ConfigurationError(
            "SQLAlchemyMiddleware needs at least one Database: "
            "SQLAlchemyMiddleware(app, Database(url))."
        )
    for db in databases:
        if not isinstance(db, BaseDatabase):
            raise ConfigurationError(
                f"SQLAlchemyMiddleware takes Database or SyncDatabase objects after the "
                f"app, not {type(db).__name__}: SQLAlchemyMiddleware(app, Database(url))."
            )
    if len(set(map(id, databases))) != len(databases):
        raise ConfigurationError(
            "The same Database was passed to SQLAlchemyMiddleware twice; pass each once."
        )


#: The databases whose transactions can be prepared (``_multidb``).
_TWO_PHASE_BACKENDS = frozenset({"postgresql", "mysql", "mariadb"})


def _two_phase_refused(db: BaseDatabase, backend: str) -> str:
    return (
        "two_phase=True needs PostgreSQL (PREPARE TRANSACTION), MySQL or MariaDB (XA "
        f"transactions); {db!r} is {backend}."
    )


def _check_two_phase(two_phase: bool, databases: tuple[BaseDatabase, ...]) -> bool:
    if check_bool("two_phase", two_phase):
        for db in databases:
            if db._engine_type is not AsyncEngine:
                raise ConfigurationError(
                    f"two_phase=True is for async databases, and {db!r} is a SyncDatabase: "
                    "use Database for the databases committed together."
                )
            url = db._url
            if url is not None and url.get_backend_name() not in _TWO_PHASE_BACKENDS:
                raise ConfigurationError(_two_phase_refused(db, url.get_backend_name()))
            db._two_phase_check = True  # startup checks max_prepared_transactions
    return two_phase
