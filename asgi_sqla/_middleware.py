"""``SQLAlchemyMiddleware``: the pure ASGI middleware."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, NoReturn

from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ._context import (
    RECEIVE_WAITED,
    REQUEST_FINISHED,
    RESPONSE_STARTED,
    SCOPE_KEY,
    SessionContext,
    _current_context,
)
from ._database import Database
from ._errors import CommitFailedError, ConfigurationError, ResponseCutShortError
from ._lifespan import LifespanRelay
from ._options import check_bool, check_number
from ._routes import PathPatterns, ReplayableBody, backoff
from ._session import is_conflict, run_to_completion
from ._stats import report, server_timing
from .types import AnyASGIApp, Message, Receive, Scope, Send

__all__ = ["SQLAlchemyMiddleware"]

logger = logging.getLogger("asgi_sqla")

_ERROR_BODY = b"Internal Server Error"
_UNAVAILABLE_BODY = b"Service Unavailable: no database connection was free. Retry shortly."
_POOL_TIMEOUT = (
    "No database connection was free within the pool timeout; answered 503 with "
    "Retry-After instead of %s. Consider a larger pool (pool_size, max_overflow)."
)
_COMMIT_FAILED = (
    "The transaction failed to commit, so the client was sent {sent} instead of the "
    "app's {replaced}; the app's later messages are discarded."
)
_CUT_SHORT = (
    "The request was cancelled as its transaction ended at response start; that "
    "response's status line was sent, and nothing more can be."
)
_DISCARDED = "The transaction failed to commit and the response was replaced; nothing more is sent."


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

    :param retry_after: When a request could not get a connection (the pool timed out)
        and its response has not started, the client gets 503 with this
        ``Retry-After`` instead of a 500, whether the exception reaches the middleware
        or the app's framework turned it into a 5xx response.
    :param read_only: Path patterns (``/reports/*``) whose transactions are read-only
        and never commit (``READ ONLY`` on PostgreSQL and MySQL).
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
        two-phase commit (PostgreSQL ``PREPARE TRANSACTION`` / ``COMMIT PREPARED``):
        all or none.  Every database must be PostgreSQL with ``max_prepared_transactions``
        above 0 (checked at startup).  Without it the databases commit one after the
        other, in the order the request first used them.
    """

    def __init__(
        self,
        app: AnyASGIApp,
        *databases: Database,
        retry_after: int = 1,
        read_only: Iterable[str] = (),
        manual_commit: Iterable[str] = (),
        retry: Iterable[str] = (),
        retry_attempts: int = 3,
        retry_body_limit: int = 64 * 1024,
        retry_backoff: float = 0.01,
        server_timing: bool = False,
        two_phase: bool = False,
    ) -> None:
        if not databases:
            raise ConfigurationError(
                "SQLAlchemyMiddleware needs at least one Database: "
                "SQLAlchemyMiddleware(app, Database(url))."
            )
        for db in databases:
            if not isinstance(db, Database):
                raise ConfigurationError(
                    f"SQLAlchemyMiddleware takes Database objects after the app, not "
                    f"{type(db).__name__}: SQLAlchemyMiddleware(app, Database(url))."
                )
        if len(set(map(id, databases))) != len(databases):
            raise ConfigurationError(
                "The same Database was passed to SQLAlchemyMiddleware twice; pass each once."
            )
        # Retry-After takes whole seconds (RFC 9110, section 10.2.3).
        check_number("retry_after", retry_after, "seconds", example=1, integer=True)
        check_number(
            "retry_attempts", retry_attempts, "re-runs after the first", example=3, integer=True
        )
        check_number("retry_body_limit", retry_body_limit, "bytes", example=64 * 1024, integer=True)
        check_number("retry_backoff", retry_backoff, "seconds", example=0.01)
        check_bool("server_timing", server_timing)
        self.app = app
        self.databases = databases
        self.retry_after = retry_after
        self._retry_after_header = (b"retry-after", str(retry_after).encode())
        self._read_only = PathPatterns("read_only", read_only)
        self._manual_commit = PathPatterns("manual_commit", manual_commit)
        self._retry = PathPatterns("retry", retry)
        self._has_routes = bool(self._read_only or self._manual_commit or self._retry)
        self._retry_attempts = retry_attempts
        self._retry_body_limit = retry_body_limit
        self._retry_backoff = float(retry_backoff)
        self._server_timing = server_timing
        if server_timing:
            for db in databases:
                db._track_stats()
        self._two_phase = _check_two_phase(two_phase, databases)

    # Any-typed so that the middleware can stand wherever a framework's own ASGI type
    # is expected (``app.asgi_app = SQLAlchemyMiddleware(...)`` in Quart).
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        scope_type = scope["type"]
        relay: _HTTPRelay | _WebSocketRelay
        if scope_type == "http":
            if self._has_routes and self._retry.match(scope["path"]):
                await self._serve_retrying(scope, receive, send)
                return
            relay = _HTTPRelay(self.databases, receive, send, self._retry_after_header)
            relay.server_timing = self._server_timing
        elif scope_type == "websocket":
            relay = _WebSocketRelay(self.databases, receive, send)
        elif scope_type == "lifespan":
            await LifespanRelay(self.app, self.databases, scope, receive, send).run()
            return
        else:
            await self.app(scope, receive, send)
            return
        if self._has_routes:
            self._apply_routes(scope, relay)
        await self._serve(scope, relay)

    def _apply_routes(self, scope: Scope, relay: SessionContext) -> None:
        path = scope["path"]
        relay._read_only = self._read_only.match(path)
        relay._manual = self._manual_commit.match(path)

    async def _serve(self, scope: Scope, relay: _HTTPRelay | _WebSocketRelay) -> None:
        """Run the app for one connection with its context bound, then end what is open.

        This is the per-request hot path: a request that reads no session pays for
        one small object and a contextvar set/reset, nothing more.
        """
        if self._two_phase:
            relay._two_phase = True
        scope[SCOPE_KEY] = relay
        token = _current_context.set(relay)
        try:
            await self.app(scope, relay.receive, relay.send)
        except Exception as exc:
            if relay._sessions:
                await relay.finish(None, reason=REQUEST_FINISHED, failed=True)
            # After a failed commit the app unwinds from the CommitFailedError raised
            # into it (perhaps re-wrapped by its framework). The client already has
            # its error answer and the cause is logged: the server has nothing to add.
            if relay.failed:
                if isinstance(relay, _HTTPRelay) and relay.retrying:
                    raise _RetryRequest from exc
                return
            if isinstance(relay, _HTTPRelay):
                if relay.may_retry(exc):
                    raise _RetryRequest from exc
                if await relay.answer_pool_timeout(exc):
                    return
            raise
        except BaseException:  # cancellation: roll back, shielded, and let it propagate
            if relay._sessions:
                await relay.finish(None, reason=REQUEST_FINISHED, failed=True)
            raise
        else:
            if relay._sessions:
                await _finish_after_return(relay)
        finally:
            relay._ended = REQUEST_FINISHED
            _current_context.reset(token)
            if relay._stats is not None:
                report(scope, relay)
        if isinstance(relay, _HTTPRelay) and relay.retrying:
            raise _RetryRequest  # the app swallowed the CommitFailedError that stopped it

    async def _serve_retrying(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a request of a ``retry`` route, re-running it after a conflict."""
        # Each attempt gets a fresh shallow copy of the scope, as the server gave it
        # (frameworks write into the scope as they route); the "state" dict is shared.
        original = dict(scope)
        body = ReplayableBody(scope, receive, self._retry_body_limit)
        attempt_receive: Receive = body.receive
        for attempt in range(self._retry_attempts + 1):
            relay = _HTTPRelay(self.databases, attempt_receive, send, self._retry_after_header)
            relay.server_timing = self._server_timing
            if attempt < self._retry_attempts:
                relay.body = body
            attempt_scope = scope if attempt == 0 else dict(original)
            self._apply_routes(attempt_scope, relay)
            try:
                await self._serve(attempt_scope, relay)
            except _RetryRequest:
                logger.info(
                    "A serialization failure or deadlock ended attempt %d of %s %s; "
                    "running the request again.",
                    attempt + 1,
                    scope.get("method", ""),
                    scope["path"],
                )
                await backoff(attempt, self._retry_backoff)
                attempt_receive = body.replay()
            else:
                return


async def _finish_after_return(relay: _HTTPRelay | _WebSocketRelay) -> None:
    # What is still open was opened after the response started (a streaming body, a
    # background task) and commits on normal return.  A response that never started
    # is the app's error: roll back.
    try:
        await relay.finish(None, reason=REQUEST_FINISHED, failed=not relay.started)
    except Exception:
        logger.error(
            "A transaction opened after the response started failed to commit; the "
            "response had already been sent.",
            exc_info=True,
        )


class _HTTPRelay(SessionContext):
    """One request's context, and its ``send`` wrapped to end the transaction first.

    The middleware never calls ``receive()`` on HTTP: the request body is the app's.
    """

    __slots__ = (
        "_retry_after",
        "_send",
        "body",
        "cut_short",
        "failed",
        "receive",
        "retrying",
        "server_timing",
        "started",
        "unavailable",
    )

    def __init__(
        self,
        databases: tuple[Database, ...],
        receive: Receive,
        send: Send,
        retry_after: tuple[bytes, bytes],
    ) -> None:
        super().__init__(databases)
        self.receive = receive
        self._send = send
        self._retry_after = retry_after
        self.started = False
        self.failed = False  # the app may send nothing more (see cut_short for why)
        self.cut_short = False  # cancelled as the response started: only its start went out
        self.unavailable = False  # a 503 was sent because the pool timed out
        self.body: ReplayableBody | None = None  # set when this attempt may be re-run
        self.retrying = False  # this attempt was stopped to be re-run
        self.server_timing = False  # add a Server-Timing header with the database time

    async def send(self, message: Message) -> None:
        if self.failed:
            if self.cut_short:
                raise ResponseCutShortError(_CUT_SHORT)
            raise CommitFailedError(_DISCARDED)
        if self.started:
            await self._send(message)
            return
        # Messages before the start (http.response.early_hint, .debug, .push) pass
        # through; only the start carries the status the outcome depends on.
        if message["type"] == "http.response.start":
            if self._sessions:
                status = message["status"]
                if status >= 500 and self.conflicted and self.may_retry(None):
                    # The framework made a 500 of the conflict: run the request again.
                    self.stop_for_retry()
                if status >= 500 and self.pool_exhausted:
                    # The app (or its framework) turned the pool timeout into an error
                    # response: say what it is, and when to come back.
                    self.unavailable = True
                    logger.warning(_POOL_TIMEOUT, status)
                    message = _unavailable(message, self._retry_after)
                try:
                    await self._end_transaction(message["status"])
                except asyncio.CancelledError as cancelled:
                    await self._cancelled_at_start(message, cancelled)
                    raise
            if self.server_timing:
                message = _with_server_timing(message, self)
            self.started = True
        await self._send(message)

    async def _cancelled_at_start(self, start: Message, cancelled: BaseException) -> None:
        """The request was cancelled (a deadline, a shutdown) while its transaction ended.

        The end ran to completion regardless (``run_to_completion``).  If the commit
        failed, nothing was committed, and whatever error is answered next is true.
        Otherwise the transaction ended as ``start``'s status decided, and only that
        status line is true: a deadline's 504 or the server's 500 would report
        committed writes as failed.  So it is sent, shielded, and nothing after it.
        """
        if cancelled.__cause__ is not None:
            text = _COMMIT_FAILED.format(sent="no response yet", replaced=f"{start['status']}")
            logger.error(text, exc_info=cancelled.__cause__)
            return
        self.started = self.failed = self.cut_short = True
        logger.warning(
            "The request was cancelled while its transaction ended at response start; "
            "only the status line (%s) is sent, the truth about the transaction.",
            start["status"],
        )
        await run_to_completion(self._send(start))

    def may_retry(self, exc: BaseException | None) -> bool:
        """Whether this attempt can be re-run after ``exc`` (None: a recorded conflict)."""
        body = self.body
        return (
            body is not None
            and not self.started
            and body.replayable
            and body.complete
            and (exc is None or is_conflict(exc))
        )

    def stop_for_retry(self) -> NoReturn:
        """Stop the app, without answering the client: the request will run again."""
        self.failed = self.retrying = True
        raise CommitFailedError("The request is stopped to be run again after a conflict.")

    async def answer_pool_timeout(self, exc: Exception) -> bool:
        """Whether the client got (or now gets) a 503 for ``exc``, a pool timeout."""
        if not _is_pool_timeout(exc):
            return False
        if self.started:
            # Already answered 503 when the framework's 5xx went out (Starlette's
            # ServerErrorMiddleware sends its 500, then re-raises for the server's log).
            return self.unavailable
        self.started = self.unavailable = True
        logger.warning(_POOL_TIMEOUT, "an exception")
        await _send_error_response(
            self._send, "http.response", 503, _UNAVAILABLE_BODY, self._retry_after
        )
        return True

    async def _end_transaction(self, status: int) -> None:
        try:
            await self.finish(status, reason=RESPONSE_STARTED)
        except Exception as exc:
            if self.may_retry(exc):
                self.stop_for_retry()
            self.failed = self.started = True
            text = _COMMIT_FAILED.format(sent="a 500 response", replaced=f"{status} response")
            logger.error(text, exc_info=True)
            await _send_error_response(self._send, "http.response")
            raise CommitFailedError(text) from exc


class _WebSocketRelay(SessionContext):
    """A websocket's context, with ``receive`` and ``send`` wrapped so idle sockets hold nothing.

    Open sessions commit (by their database's policy) and close whenever the app
    waits for the next client message, and before a close or denial response.
    """

    __slots__ = ("_receive", "_send", "accepted", "failed", "started")

    def __init__(self, databases: tuple[Database, ...], receive: Receive, send: Send) -> None:
        super().__init__(databases)
        self._receive = receive
        self._send = send
        self.accepted = False
        self.started = True  # a websocket app that returns normally commits
        self.failed = False

    async def receive(self) -> Message:
        if self.failed:
            raise CommitFailedError(_DISCARDED)
        if self._sessions:
            await self._end_transaction(None, "next message", reason=RECEIVE_WAITED)
        return await self._receive()

    async def send(self, message: Message) -> None:
        if self.failed:
            raise CommitFailedError(_DISCARDED)
        message_type = message["type"]
        if message_type == "websocket.accept":
            self.accepted = True
        elif self._sessions:
            if message_type == "websocket.close":
                # A close before accept is answered with HTTP 403 by the server (ASGI
                # websocket spec, "Close - send event"), so it is decided as a 403.
                status = None if self.accepted else 403
                await self._end_transaction(status, "close", reason=RESPONSE_STARTED)
            elif message_type == "websocket.http.response.start":  # the denial extension
                status = message["status"]
                await self._end_transaction(status, f"{status} denial", reason=RESPONSE_STARTED)
        await self._send(message)

    async def _end_transaction(self, status: int | None, replaced: str, *, reason: str) -> None:
        try:
            await self.finish(status, reason=reason)
        except Exception as exc:
            self.failed = True
            if replaced.endswith("denial"):
                sent = "a 500 denial response"
                await _send_error_response(self._send, "websocket.http.response")
            else:
                sent = "a 1011 close"
                await self._send({"type": "websocket.close", "code": 1011, "reason": ""})
            text = _COMMIT_FAILED.format(sent=sent, replaced=replaced)
            logger.error(text, exc_info=True)
            raise CommitFailedError(text) from exc


async def _send_error_response(
    send: Send,
    prefix: str,
    status: int = 500,
    body: bytes = _ERROR_BODY,
    *headers: tuple[bytes, bytes],
) -> None:
    """Send a complete plain-text response (``prefix`` picks HTTP or websocket denial)."""
    await send(
        {
            "type": f"{prefix}.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": f"{prefix}.body", "body": body, "more_body": False})


class _RetryRequest(Exception):
    """Raised by one attempt of a ``retry`` route to have the request run again."""


def _check_two_phase(two_phase: bool, databases: tuple[Database, ...]) -> bool:
    if check_bool("two_phase", two_phase):
        for db in databases:
            url = db._url
            if url is not None and url.get_backend_name() != "postgresql":
                raise ConfigurationError(
                    f"two_phase=True needs PostgreSQL (PREPARE TRANSACTION); {db!r} is "
                    f"{url.get_backend_name()}."
                )
            db._two_phase_check = True  # startup checks max_prepared_transactions
    return two_phase


def _with_server_timing(start: Message, context: SessionContext) -> Message:
    """``start`` with a ``Server-Timing`` header, when the request used a database."""
    header = server_timing(context)
    if header is None:
        return start
    return {**start, "headers": [*start.get("headers", ()), header]}


def _unavailable(start: Message, retry_after: tuple[bytes, bytes]) -> Message:
    """``start`` turned into a 503 with a Retry-After header."""
    headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"retry-after"]
    return {**start, "status": 503, "headers": [*headers, retry_after]}


def _is_pool_timeout(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from, is SQLAlchemy's pool timeout."""
    seen = 0
    while exc is not None and seen < 8:  # frameworks may re-wrap; chains are short
        if isinstance(exc, PoolTimeoutError):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False
