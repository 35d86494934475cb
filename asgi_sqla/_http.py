"""One HTTP request: its unit of work, and ``send`` wrapped to end the transaction first.

The ordering that makes the status line true: when the app sends
``http.response.start``, the request's sessions are ended (committed or rolled back,
and their connections returned) *before* the message is forwarded.  If the commit
fails the client gets a 500 instead, and the app's later messages are refused with
``CommitFailedError``.  When the database was unavailable (``_unavailable``: the pool
timed out, the connection was lost or refused, the server turned read-only), the
answer is a 503 with ``Retry-After`` instead of a 500, whether the app's framework
made a 5xx of it, the exception reached the middleware, or the COMMIT failed so; it is
still an error status, so it claims no commit.  Messages before the start
(``http.response.early_hint``, ``.debug``, ``.push``) pass through.  The middleware
never calls ``receive()`` on HTTP: the request body is the app's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import NoReturn

from ._errors import CommitFailedError, ResponseCutShortError
from ._log import Throttle, logger
from ._routes import ReplayableBody
from ._session import is_conflict, run_to_completion
from ._stats import server_timing
from ._unavailable import BUSY, POOL_TIMEOUT, READ_ONLY, UNREACHABLE, unavailable
from ._unit import REQUEST_FINISHED, RESPONSE_STARTED, SessionContext
from .types import Message, Receive, Send

__all__ = [
    "HTTPOptions",
    "HTTPResponder",
    "RetryRequest",
    "send_error_response",
    "unwinds_failure",
]


_ERROR_BODY = b"Internal Server Error"
_UNAVAILABLE_BODY = "Service Unavailable: {reason}. Retry shortly."
_UNAVAILABLE = "%s; answered 503 with Retry-After instead of %s. %s%s"
_SKIPPED = " (and {count} more such 503s since the last of these warnings)"
#: What to do next, by reason (see ``_unavailable``).
_ADVICE = {
    POOL_TIMEOUT: "Consider a larger pool (pool_size, max_overflow).",
    UNREACHABLE: (
        "Requests succeed again once it answers (after a restart or a failover); "
        "pool_pre_ping=True replaces the pooled connections it dropped."
    ),
    BUSY: (
        "Raise admission_limit with the pool (pool_size + max_overflow), or let "
        "requests wait for a place a little (admission_timeout)."
    ),
    READ_ONLY: (
        "Its connection was discarded, and so are the older pooled ones at their next "
        "checkout; requests succeed again once a writable server answers (a failover?)."
    ),
}
COMMIT_FAILED = (
    "The transaction failed to commit, so the client was sent {sent} instead of the "
    "app's {replaced}; the app's later messages are discarded."
)
_CUT_SHORT = (
    "The request was cancelled as its transaction ended at response start; that "
    "response's status line was sent, and nothing more can be."
)
DISCARDED = "The transaction failed to commit and the response was replaced; nothing more is sent."
_AFTER_START_FAILED = (
    "A transaction opened after the response started failed to commit; the response "
    "had already been sent."
)
_UNRELATED_AFTER_FAILURE = (
    "The app raised an exception after its transaction failed to commit and its "
    "response was replaced with a 500 (logged above); this exception is another error."
)


@dataclass(frozen=True)
class HTTPOptions:
    """What the middleware's configuration says about HTTP responses."""

    retry_after: tuple[bytes, bytes]
    server_timing: bool
    #: The middleware's "answered 503" warnings, at most one a second for each reason.
    warnings: Throttle = field(default_factory=Throttle)


class RetryRequest(Exception):
    """Raised by one attempt of a ``retry`` route to have the request run again."""


class HTTPResponder:
    """Relays one request's messages, ending its unit of work at response start."""

    # Class-level defaults: one responder is made per request, and most requests
    # change only ``started`` and ``_last_sent``.
    started = False
    _last_sent: Message | None = None  # after the start: see ``complete``
    failed = False  # the app may send nothing more (see cut_short for why)
    cut_short = False  # cancelled as the response started: only its start went out
    unavailable = False  # a 503 was sent because the database was unavailable
    body: ReplayableBody | None = None  # set when this attempt may be re-run
    retrying = False  # this attempt was stopped to be re-run

    def __init__(
        self, unit: SessionContext, receive: Receive, send: Send, options: HTTPOptions
    ) -> None:
        self.unit = unit
        self.receive = receive
        self._send = send
        self._options = options
        # Read at every send: an instance's own attributes are read faster than a
        # class's (CPython specialises the first), more than their setting costs here.
        self.started = False
        self.failed = False

    async def send(self, message: Message) -> None:
        if self.failed:
            if self.cut_short:
                raise ResponseCutShortError(_CUT_SHORT)
            raise CommitFailedError(DISCARDED)
        if self.started:
            await self._send(message)
            self._last_sent = message
            return
        if message["type"] == "http.response.start":
            if self.unit._sessions:
                message = await self._end_at_start(message)
            if self._options.server_timing:
                message = _with_server_timing(message, self.unit)
            self.started = True
        await self._send(message)

    async def _end_at_start(self, start: Message) -> Message:
        """End the unit's transactions for ``start``'s status; return what to send."""
        unit = self.unit
        if start["status"] >= 500:
            if unit.conflicted and self.may_retry(None):
                # The framework made a 500 of the conflict: run the request again.
                self.stop_for_retry()
            reason = unit.unavailable
            if reason is not None:
                # The app (or its framework) turned the database's unavailability into
                # an error response: say what it is, and when to come back.
                self.unavailable = True
                _log_unavailable(self._options.warnings, reason, start["status"])
                start = _unavailable(start, self._options.retry_after)
        try:
            outcome = await unit.end(start["status"], reason=RESPONSE_STARTED)
        except asyncio.CancelledError:
            await self._cancelled_at_start(start)
            raise
        if outcome.failed:
            await self._answer_failed_commit(start, outcome.error)
        return start

    async def _answer_failed_commit(self, start: Message, error: BaseException | None) -> NoReturn:
        if self.may_retry(error):
            self.stop_for_retry()
        self.failed = self.started = True
        # A 503 invites the same request again: not once a part of it was committed
        # (another database committed first, or the app called db.commit()).
        reason = None if self.unit.committed_any else unavailable(error)
        sent = "a 500 response" if reason is None else f"a 503 response ({reason})"
        text = COMMIT_FAILED.format(sent=sent, replaced=f"{start['status']} response")
        logger.error(text, exc_info=error)
        if reason is None:
            await send_error_response(self._send, "http.response")
        else:
            self.unavailable = True
            await self._send_unavailable(reason)
        raise CommitFailedError(text) from error

    async def _cancelled_at_start(self, start: Message) -> None:
        """The request was cancelled (a deadline, a shutdown) while its transaction ended.

        The end ran to completion regardless (``run_to_completion``).  If the commit
        failed, nothing was committed, and whatever error is answered next is true.
        Otherwise the transaction ended as ``start``'s status decided, and only that
        status line is true: a deadline's 504 or the server's 500 would report
        committed writes as failed.  So it is sent, shielded, and nothing after it.
        """
        outcome = self.unit.outcome
        if outcome is not None and outcome.failed:
            text = COMMIT_FAILED.format(sent="no response yet", replaced=f"{start['status']}")
            logger.error(text, exc_info=outcome.error)
            return
        self.started = self.failed = self.cut_short = True
        logger.warning(
            "The request was cancelled while its transaction ended at response start; "
            "only the status line (%s) is sent, the truth about the transaction.",
            start["status"],
        )
        await run_to_completion(self._send(start))

    @property
    def complete(self) -> bool:
        """Whether the response was sent to its end (its last message went out)."""
        last = self._last_sent
        return last is not None and _ends_response(last)

    def may_retry(self, exc: BaseException | None) -> bool:
        """Whether this attempt can be re-run after ``exc`` (None: a recorded conflict).

        Never once anything of the request was committed: running it again would
        write that part twice.
        """
        body = self.body
        return (
            body is not None
            and not self.started
            and body.replayable
            and not self.unit.committed_any
            and (exc is None or is_conflict(exc))
        )

    def stop_for_retry(self) -> NoReturn:
        """Stop the app, without answering the client: the request will run again."""
        self.failed = self.retrying = True
        raise CommitFailedError("The request is stopped to be run again after a conflict.")

    async def app_raised(self, exc: Exception) -> bool:
        """End the unit after the app raised ``exc``; True when the error is answered."""
        if self.unit.has_sessions:
            await self.unit.close(reason=REQUEST_FINISHED, failed=True)
        if self.failed:
            # After a failed commit the app unwinds from the CommitFailedError raised
            # into it (perhaps re-wrapped by its framework): the client already has its
            # answer and the cause is logged.  Anything else is another error: log it.
            if self.retrying:
                raise RetryRequest from exc
            if not unwinds_failure(exc):
                logger.error(_UNRELATED_AFTER_FAILURE, exc_info=exc)
            return True
        if self.may_retry(exc):
            raise RetryRequest from exc
        return await self._answer_unavailable(exc)

    async def app_returned(self) -> None:
        """End what the app left open when it returned normally."""
        if self.unit.has_sessions:
            # What is still open was opened after the response started (a streaming
            # body, a background task): it commits only if the response was sent to its
            # end.  A response cut short (the client left, Starlette cancelled the
            # stream and returned normally) or never started rolls back.
            outcome = await self.unit.close(reason=REQUEST_FINISHED, failed=not self.complete)
            if outcome.failed:
                logger.error(_AFTER_START_FAILED, exc_info=outcome.error)
        if self.retrying:
            raise RetryRequest  # the app swallowed the CommitFailedError that stopped it

    async def _answer_unavailable(self, exc: Exception) -> bool:
        """Whether the client got (or now gets) a 503 for ``exc``: the database was unavailable."""
        reason = unavailable(exc)
        if reason is None:
            return False
        if self.started:
            # Already answered 503 when the framework's 5xx went out (Starlette's
            # ServerErrorMiddleware sends its 500, then re-raises for the server's log).
            return self.unavailable
        self.started = self.unavailable = True
        _log_unavailable(self._options.warnings, reason, "an exception", exc)
        await self._send_unavailable(reason)
        return True

    async def _send_unavailable(self, reason: str) -> None:
        body = _UNAVAILABLE_BODY.format(reason=reason).encode()
        await send_error_response(self._send, "http.response", 503, body, self._options.retry_after)


def _log_unavailable(
    warnings: Throttle, reason: str, replaced: object, exc: Exception | None = None
) -> None:
    # An outage or an overload fails every request alike, thousands a second: one line
    # a second for each reason says as much, and keeps the log readable and cheap.
    skipped = warnings.allow(reason)
    if skipped is None:
        return
    said = reason[:1].upper() + reason[1:]
    more = _SKIPPED.format(count=skipped) if skipped else ""
    # The exception the middleware answered for, which nothing else logs: what the
    # driver said (a refused connection, which host) or why no connection could be
    # made (a password provider that failed).  Not for the pool and the admission
    # limit, whose cause the message gives in full.
    shown = exc if reason is not POOL_TIMEOUT and reason is not BUSY else None
    logger.warning(_UNAVAILABLE, said, replaced, _ADVICE.get(reason, ""), more, exc_info=shown)


def unwinds_failure(exc: BaseException | None, depth: int = 0) -> bool:
    """Whether ``exc`` is the error raised into the app to stop it, or a wrapping of it.

    A wrapping is an exception raised *from* it (``raise ... from``, as frameworks
    re-wrap), or an exception group of nothing else (a task group).  An exception
    merely raised while handling it (its ``__context__``) is another error.
    """
    while exc is not None and depth < 8:
        if isinstance(exc, (CommitFailedError, ResponseCutShortError)):
            return True
        grouped = getattr(exc, "exceptions", None)  # BaseExceptionGroup, 3.11+ or backport
        if isinstance(grouped, tuple) and grouped:
            return all(unwinds_failure(e, depth + 1) for e in grouped)
        exc = exc.__cause__
        depth += 1
    return False


def _ends_response(message: Message) -> bool:
    """Whether ``message`` is the last of a response (ASGI HTTP spec and extensions)."""
    message_type = message["type"]
    if message_type == "http.response.body" or message_type == "http.response.zerocopysend":
        return not message.get("more_body", False)
    return bool(message_type == "http.response.pathsend")


async def send_error_response(
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


def _with_server_timing(start: Message, unit: SessionContext) -> Message:
    """``start`` with a ``Server-Timing`` header, when the request used a database."""
    header = server_timing(unit.all_stats().values())
    if header is None:
        return start
    return {**start, "headers": [*start.get("headers", ()), header]}


def _unavailable(start: Message, retry_after: tuple[bytes, bytes]) -> Message:
    """``start`` turned into a 503 with a Retry-After header."""
    headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"retry-after"]
    return {**start, "status": 503, "headers": [*headers, retry_after]}
