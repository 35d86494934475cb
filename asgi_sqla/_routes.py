"""Per-route transaction policies: read-only, manual commit, and retry on conflict.

Routes choose a policy by path pattern given to the middleware, or (read-only and
manual commit) with a decorator on the handler.  Nothing here runs for a request
unless the middleware was given a pattern.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import random
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import ParamSpec, TypeVar

from ._errors import ConfigurationError
from ._unit import SessionContext
from .types import Message, Receive, Scope

__all__ = ["manual_commit", "read_only"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


class PathPatterns:
    """Shell-style path patterns (``/reports/*``, ``/orders/*/pay``) compiled into one regex."""

    __slots__ = ("_regex", "patterns")

    def __init__(self, option: str, patterns: Iterable[str]) -> None:
        if isinstance(patterns, str):
            raise ConfigurationError(
                f"{option} takes a list of path patterns, e.g. {option}=[{patterns!r}]."
            )
        self.patterns = tuple(patterns)
        for pattern in self.patterns:
            if not isinstance(pattern, str) or not pattern.startswith("/"):
                raise ConfigurationError(
                    f"{option} patterns are paths starting with '/', like '/reports/*'; "
                    f"got {pattern!r}."
                )
        translated = "|".join(fnmatch.translate(p) for p in self.patterns)
        self._regex = re.compile(translated) if self.patterns else None

    def __bool__(self) -> bool:
        return self._regex is not None

    def match(self, scope: Scope) -> bool:
        path = scope.get("path")
        return self._regex is not None and self._regex.match(str(path)) is not None


def read_only(handler: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
    """Decorate a handler so the sessions it opens are read-only and never commit.

    Sessions already open when the handler starts (opened by a dependency, say) keep
    their mode; give the route to the middleware's ``read_only=`` patterns to cover
    the whole request.
    """

    @functools.wraps(handler)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        SessionContext.current().read_only = True
        return await handler(*args, **kwargs)

    return wrapper


def manual_commit(handler: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
    """Decorate a handler so nothing is committed automatically for its request.

    The handler commits with ``await db.commit()`` (or ``release()``); whatever is left
    open when the response starts is rolled back.
    """

    @functools.wraps(handler)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        SessionContext.current().manual = True
        return await handler(*args, **kwargs)

    return wrapper


async def backoff(attempt: int, base: float) -> None:
    """Sleep a random time up to ``base * 2**attempt`` ("full jitter")."""
    await asyncio.sleep(random.uniform(0, base * 2**attempt))


class ReplayableBody:
    """Records the request body as the app reads it, so the request can be re-run.

    ``replayable`` stays true only while the body read so far is within ``limit`` and,
    once the app is done, only if the body was read to its end (or the request has
    none).
    """

    __slots__ = ("_chunks", "_limit", "_receive", "_size", "complete", "replayable")

    def __init__(self, scope: Scope, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.replayable = True
        self.complete = not _has_body(scope)

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request" and self.replayable:
            body = message.get("body", b"")
            self._size += len(body)
            if self._size > self._limit:
                self.replayable = False
                self._chunks.clear()
            else:
                self._chunks.append(body)
                if not message.get("more_body", False):
                    self.complete = True
        return message

    def replay(self) -> Receive:
        """A ``receive`` that gives the recorded body once, then the server's messages."""
        pending: list[Message] = [
            {"type": "http.request", "body": b"".join(self._chunks), "more_body": False}
        ]
        receive = self._receive

        async def replayed() -> Message:
            if pending:
                return pending.pop()
            return await receive()

        return replayed


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False
