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
from typing import Any, ParamSpec, TypeVar, overload

from ._errors import ConfigurationError
from ._options import check_bool
from ._unit import SessionContext
from .types import Message, Receive, Scope

__all__ = ["manual_commit", "read_only"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


#: Whether a scope without ``path`` falls under each option's patterns.  The ASGI spec
#: requires ``path``, but a middleware in front may have dropped it, and then the route
#: is unknown.  Guess in the direction that does no harm: a route that might be
#: read-only or manual-commit is treated as one (at worst a write is not committed,
#: where a wrong guess the other way commits writes the route forbids), while only
#: routes known to be safe to run twice are retried.
_MATCHES_WITHOUT_PATH = {
    "read_only": True,
    "manual_commit": True,
    "retry": False,
    # Read-only all the same (the middleware adds these patterns to read_only's), but
    # in a transaction: autocommit gives up the one snapshot a route may rely on.
    "autocommit_reads": False,
}

#: Whether each option's patterns match a path in any letter case.  BlackSheep routes
#: case-insensitively (its ``Route`` compiles its pattern with ``re.IGNORECASE``,
#: ``blacksheep/server/routing.py``), so ``/REPORTS/1`` reaches the handler of
#: ``/reports/{id}``: a policy that must not be escaped covers every case; retry, which
#: must not run a route twice by mistake, matches the case as written.
_MATCHES_ANY_CASE = {
    "read_only": True,
    "manual_commit": True,
    "retry": False,
    "autocommit_reads": False,
}

_REPEATED_SLASHES = re.compile("/{2,}")


class PathPatterns:
    """Shell-style path patterns (``/reports/*``, ``/orders/*/pay``) compiled into one regex.

    A request matches when its path matches as frameworks route it: repeated slashes
    merged, a trailing slash ignored (patterns are normalised the same way), taken both
    as it is and without ``root_path``, and for ``read_only`` and ``manual_commit`` in
    any letter case (``_MATCHES_ANY_CASE``).  So every spelling of a covered route is
    covered: a policy must not be escaped by writing ``//reports/1``.  A path with a
    trailing slash also matches as sent (``/reports/*`` covers ``/reports/``, not
    ``/reports``), as it did before paths were normalised: matching more is the safe
    direction.  A scope without ``path`` matches as ``_MATCHES_WITHOUT_PATH`` says:
    ``read_only`` and ``manual_commit`` patterns yes, ``retry`` patterns no.
    """

    __slots__ = ("_regex", "_without_path", "patterns")

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
        translated = "|".join(fnmatch.translate(_route_path(p)) for p in self.patterns)
        flags = re.IGNORECASE if _MATCHES_ANY_CASE[option] else 0
        self._regex = re.compile(translated, flags) if self.patterns else None
        self._without_path = _MATCHES_WITHOUT_PATH[option]

    def __bool__(self) -> bool:
        return self._regex is not None

    def match(self, scope: Scope) -> bool:
        """Whether the request of ``scope`` is on a route the patterns cover."""
        regex = self._regex
        if regex is None:
            return False
        path = scope.get("path")
        if not isinstance(path, str):
            return self._without_path
        for sent in _paths_sent(path, scope.get("root_path") or ""):
            route_path = sent.rstrip("/") or "/"
            if regex.match(route_path) or (sent != route_path and regex.match(sent)):
                return True
        return False


def _paths_sent(path: str, root_path: str) -> tuple[str, ...]:
    """``path``, and what follows ``root_path`` in it, each with repeated slashes merged."""
    if root_path and root_path in path:
        # Servers disagree on whether path includes root_path (django/asgiref#229,
        # #424): uvicorn puts it in front since Kludex/uvicorn#2213, hypercorn does
        # not.  Starlette (``_utils.get_route_path``) and Quart take it off the front;
        # Litestar cuts the path after its first occurrence anywhere
        # (``path.split(root_path, maxsplit=1)[-1]`` in ``_asgi/asgi_router.py``, from
        # litestar-org/litestar#3039), which covers both.  What the app does is
        # unknown here, so both paths count.
        return _merged(path), _merged(path.partition(root_path)[2])
    return (_merged(path),)


def _merged(path: str) -> str:
    """``path`` with one slash in front and none repeated.

    Litestar routes the path so, and without a trailing slash
    (``litestar.utils.path.normalize_path``); Werkzeug, under Quart, merges repeated
    slashes too (``Map(merge_slashes=True)``).
    """
    return "/" + _REPEATED_SLASHES.sub("/", path).lstrip("/")


def _route_path(pattern: str) -> str:
    """``pattern`` normalised like a path: one slash in front, none repeated, none at the end."""
    return _merged(pattern).rstrip("/") or "/"


@overload
def read_only(handler: Callable[_P, Awaitable[_R]], /) -> Callable[_P, Awaitable[_R]]: ...
@overload
def read_only(
    *, autocommit: bool = False
) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Awaitable[_R]]]: ...
def read_only(
    handler: Callable[_P, Awaitable[_R]] | None = None, /, *, autocommit: bool = False
) -> Any:
    """Decorate a handler so the sessions it opens are read-only and never commit.

    ``@read_only(autocommit=True)`` also runs their statements in autocommit, as the
    middleware's ``autocommit_reads=`` routes do: no ``BEGIN`` nor ``COMMIT``, one
    round trip per statement, each statement with its own snapshot, and writes
    refused before they are sent (see docs/guides/autocommit-reads.md).

    Sessions already open when the handler starts (opened by a dependency, say) keep
    their mode; give the route to the middleware's ``read_only=`` (or
    ``autocommit_reads=``) patterns to cover the whole request.
    """
    check_bool("autocommit", autocommit, example="@read_only(autocommit=True)")
    if handler is None:
        return functools.partial(_read_only, autocommit=autocommit)
    if not callable(handler):
        raise ConfigurationError(
            f"@read_only decorates a handler, not {type(handler).__name__}; for options, "
            "write @read_only(autocommit=True)."
        )
    return _read_only(handler, autocommit=autocommit)


def _read_only(
    handler: Callable[_P, Awaitable[_R]], *, autocommit: bool
) -> Callable[_P, Awaitable[_R]]:
    @functools.wraps(handler)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        unit = SessionContext.current()
        unit.read_only = True
        if autocommit:
            unit.autocommit = True
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


# What a recorded request body allows (the states of ``ReplayableBody``).
_READING = "reading"  # more body may come: a re-run would get only part of it
_WHOLE = "whole"  # the whole body was read and kept, or provably there is none
_LOST = "lost"  # over the limit, or the client is gone: no re-run, for good


class ReplayableBody:
    """Records the request body as the app reads it, so the request can be re-run.

    A request is re-run only with its whole body: ``replayable`` turns true with the
    ``http.request`` message whose ``more_body`` is false (from the start, when the
    request provably has no body), and false for good when the body outgrows
    ``limit`` or the client disconnects.
    """

    __slots__ = ("_chunks", "_limit", "_receive", "_size", "_state")

    def __init__(self, scope: Scope, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._state = _WHOLE if _provably_empty(scope) else _READING

    @property
    def replayable(self) -> bool:
        """Whether a re-run would get the whole body the client sent."""
        return self._state is _WHOLE

    async def receive(self) -> Message:
        message = await self._receive()
        if self._state is not _LOST:
            self._record(message)
        return message

    def _record(self, message: Message) -> None:
        if message["type"] == "http.disconnect":
            # Nobody is left to answer: a re-run would only write for no one.
            self._lose()
        elif message["type"] == "http.request":
            body = message.get("body", b"")
            self._size += len(body)
            if self._size > self._limit:
                self._lose()
            else:
                self._chunks.append(body)
                self._state = _READING if message.get("more_body", False) else _WHOLE

    def _lose(self) -> None:
        self._state = _LOST
        self._chunks.clear()

    def replay(self) -> Receive:
        """A ``receive`` that gives the recorded body once, then the server's messages.

        The server's messages are recorded as before, so a client that disconnects
        during a re-run stops the next one.
        """
        pending: list[Message] = [
            {"type": "http.request", "body": b"".join(self._chunks), "more_body": False}
        ]
        receive = self.receive

        async def replayed() -> Message:
            if pending:
                return pending.pop()
            return await receive()

        return replayed


def _provably_empty(scope: Scope) -> bool:
    """Whether the request's headers prove it has no body, before any of it is read."""
    lengths: list[bytes] = []
    for name, value in scope.get("headers", ()):
        name = name.lower()
        if name == b"transfer-encoding":
            # Overrides Content-Length (RFC 9112, section 6.3): only the last chunk ends it.
            return False
        if name == b"content-length":
            lengths.append(value.strip())
    if lengths:
        # Over HTTP/2 and 3 too: a Content-Length must equal the body's DATA frames
        # (RFC 9113, section 8.1.1; RFC 9114, section 4.1.2).
        return all(length.isdigit() and int(length) == 0 for length in lengths)
    # RFC 9112, section 6.3: an HTTP/1.x request with neither header has no body.  An
    # HTTP/2 or 3 request needs neither for a body (its DATA frames end with
    # END_STREAM, which ASGI servers pass on as more_body false), so there, and when
    # the scope does not say which version, only that final message proves the end.
    return scope.get("http_version") in ("1.0", "1.1")
