"""A minimal ASGI server inside this process: lifespan, and HTTP requests called directly.

No sockets and no HTTP parsing, so the time measured is the app's (and its
middleware's) alone.  It behaves as uvicorn does where that matters to the apps:
each request's scope carries a copy of the lifespan state and ``spec_version`` 2.3,
and ``receive()`` blocks (as for a client still connected) until the response has
been sent, then answers ``http.disconnect``.

A slow client is modelled in ``send()``: each body chunk takes ``chunk_delay``
seconds to go out, as when a server's ``send`` waits for a client that reads slowly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

__all__ = ["ASGIApp", "InProcessServer", "Message", "Outcome", "Receive", "Scope", "Send"]

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_LIFESPAN_TIMEOUT = 30.0


@dataclass
class Outcome:
    """What a client saw: the status (None if no response started), the body, the error.

    ``error`` is the exception the app raised to the server, if any (after or instead
    of a response), as ``"TypeName: message"``.
    """

    status: int | None
    body: bytes
    error: str | None


class _Exchange:
    """The ``receive`` and ``send`` of one request."""

    __slots__ = (
        "chunk_delay",
        "chunks",
        "complete",
        "on_first_chunk",
        "request_body",
        "status",
        "waiter",
    )

    def __init__(
        self,
        request_body: bytes,
        chunk_delay: float,
        on_first_chunk: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.request_body: bytes | None = request_body
        self.chunk_delay = chunk_delay
        self.on_first_chunk = on_first_chunk
        self.status: int | None = None
        self.chunks: list[bytes] = []
        self.complete = False
        self.waiter: asyncio.Future[None] | None = None

    async def receive(self) -> Message:
        body = self.request_body
        if body is not None:
            self.request_body = None
            return {"type": "http.request", "body": body, "more_body": False}
        if not self.complete:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
        elif kind == "http.response.body":
            chunk = message.get("body", b"")
            if chunk:
                self.chunks.append(chunk)
                if self.on_first_chunk is not None and len(self.chunks) == 1:
                    await self.on_first_chunk()
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            if not message.get("more_body", False):
                self.complete = True
                waiter = self.waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)


class InProcessServer:
    """Runs ``app``'s lifespan on ``async with`` and calls it for requests.

    >>> async with InProcessServer(app) as server:
    ...     outcome = await server.request("GET", "/item")
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> InProcessServer:
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        self._task = asyncio.create_task(self._run_lifespan(scope))
        await self._lifespan_step("startup")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._lifespan_step("shutdown")
        if self._task is not None:
            await asyncio.wait_for(self._task, _LIFESPAN_TIMEOUT)

    async def _run_lifespan(self, scope: Scope) -> None:
        await self.app(scope, self._to_app.get, self._from_app.put)

    async def _lifespan_step(self, phase: str) -> None:
        await self._to_app.put({"type": f"lifespan.{phase}"})
        message = await asyncio.wait_for(self._from_app.get(), _LIFESPAN_TIMEOUT)
        if message["type"] != f"lifespan.{phase}.complete":
            raise RuntimeError(f"lifespan {phase} failed: {message.get('message', message)}")

    def scope(self, method: str, path: str) -> dict[str, Any]:
        """An HTTP scope as uvicorn builds it (without ``state``, added per request)."""
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 50000),
            "scheme": "http",
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [(b"host", b"127.0.0.1:8000"), (b"content-length", b"0")],
        }

    async def request(
        self,
        method: str,
        path: str,
        *,
        chunk_delay: float = 0.0,
        on_first_chunk: Callable[[], Awaitable[None]] | None = None,
    ) -> Outcome:
        """Call the app once; return what the client saw, and any exception it raised.

        ``on_first_chunk`` is awaited when the first body chunk reaches the client:
        the moment to look at what the app still holds while its body goes out.
        """
        exchange = _Exchange(b"", chunk_delay, on_first_chunk)
        scope = {**self.scope(method, path), "state": self.state.copy()}
        error: str | None = None
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception as exc:  # what a server would log after (or instead of) a response
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return Outcome(exchange.status, b"".join(exchange.chunks), error)

    async def latencies(self, method: str, path: str, count: int, expect: int) -> list[float]:
        """Call the app ``count`` times one after another; return each one's seconds.

        Raises ``RuntimeError`` if a response is not ``expect``, as :meth:`time_requests`.
        """
        app = self.app
        template = self.scope(method, path)
        state = self.state
        samples: list[float] = []
        bad = 0
        for _ in range(count):
            exchange = _Exchange(b"", 0.0)
            started = time.perf_counter()
            await app({**template, "state": state.copy()}, exchange.receive, exchange.send)
            samples.append(time.perf_counter() - started)
            if exchange.status != expect:
                bad += 1
        if bad:
            raise RuntimeError(f"{bad} of {count} responses to {method} {path} were not {expect}")
        return samples

    async def time_requests(
        self, method: str, path: str, count: int, expect: int
    ) -> tuple[float, float]:
        """Call the app ``count`` times one after another; return seconds per request.

        Two clocks: wall time (``perf_counter``) and this process's CPU time
        (``process_time``, all threads, so aiosqlite's too), which other processes on
        a busy machine do not inflate.  Raises ``RuntimeError`` if a response is not
        ``expect``: a benchmark of failing requests would measure the wrong thing.
        """
        app = self.app
        template = self.scope(method, path)
        state = self.state
        bad = 0
        cpu_started = time.process_time()
        started = time.perf_counter()
        for _ in range(count):
            exchange = _Exchange(b"", 0.0)
            await app({**template, "state": state.copy()}, exchange.receive, exchange.send)
            if exchange.status != expect:
                bad += 1
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        if bad:
            raise RuntimeError(f"{bad} of {count} responses to {method} {path} were not {expect}")
        return elapsed / count, cpu / count
