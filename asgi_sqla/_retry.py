"""Retry routes: a request re-run from the start after a serialization failure or deadlock.

An attempt is re-run only when the conflict came before the response started, the
request body was read in full and kept (``ReplayableBody``), and nothing of the
request was committed yet (``SessionContext.committed_any``): a request that
committed part of its work and then conflicted would write that part twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ._http import HTTPResponder, RetryRequest
from ._log import logger, printable
from ._options import check_number
from ._routes import ReplayableBody, backoff
from .types import Receive, Scope

__all__ = ["RetryPolicy", "serve_retrying"]

_RETRYING = (
    "A serialization failure or deadlock ended attempt %d of %s %s; running the request again."
)


class RetryPolicy:
    """How often and how patiently a ``retry`` route is re-run."""

    __slots__ = ("attempts", "backoff", "body_limit")

    def __init__(self, attempts: int, body_limit: int, backoff: float) -> None:
        self.attempts = attempts
        self.body_limit = body_limit
        self.backoff = backoff

    @classmethod
    def checked(cls, attempts: int, body_limit: int, backoff: float) -> RetryPolicy:
        """The policy, once the middleware's ``retry_*`` options are checked."""
        check_number("retry_attempts", attempts, "re-runs after the first", example=3, integer=True)
        check_number("retry_body_limit", body_limit, "bytes", example=64 * 1024, integer=True)
        check_number("retry_backoff", backoff, "seconds", example=0.01)
        return cls(attempts, body_limit, float(backoff))


async def serve_retrying(
    scope: Scope,
    receive: Receive,
    policy: RetryPolicy,
    make_responder: Callable[[Scope, Receive], HTTPResponder],
    serve: Callable[[Scope, HTTPResponder], Awaitable[None]],
) -> None:
    """Serve a request of a ``retry`` route, re-running it after a conflict."""
    # Each attempt gets a fresh shallow copy of the scope, as the server gave it
    # (frameworks write into the scope as they route); the "state" dict is shared.
    original = dict(scope)
    body = ReplayableBody(scope, receive, policy.body_limit)
    attempt_receive: Receive = body.receive
    for attempt in range(policy.attempts + 1):
        attempt_scope = scope if attempt == 0 else dict(original)
        responder = make_responder(attempt_scope, attempt_receive)
        if attempt < policy.attempts:
            responder.body = body
        try:
            await serve(attempt_scope, responder)
        except RetryRequest:
            path = printable(str(scope.get("path", "")))
            logger.info(_RETRYING, attempt + 1, scope.get("method", ""), path)
            await backoff(attempt, policy.backoff)
            attempt_receive = body.replay()
        else:
            return
