"""Lifespan: databases up before the app's startup, down after its shutdown."""

from __future__ import annotations

from ._database import Database
from ._log import logger
from .types import AnyASGIApp, Message, Receive, Scope, Send

#: Where the databases are published in the lifespan ``state`` (copied by the server
#: into every request's scope as ``scope["state"]``).
STATE_KEY = "asgi_sqla.databases"


class LifespanRelay:
    """Relays one lifespan conversation between the server and the wrapped app.

    The protocol cases, and what the relay does in each (the ASGI lifespan spec:
    https://asgi.readthedocs.io/en/latest/specs/lifespan.html):

    1. The app reads ``lifespan.startup``: the databases start first.  If one does not
       answer, the server gets ``lifespan.startup.failed`` naming it, and the app's
       ``receive()`` raises ``DatabaseStartupError``.
    2. The app sends ``startup.complete`` or ``startup.failed``: forwarded once; on
       failure the engines are disposed first.
    3. The server sends ``lifespan.shutdown``: handed to the app; the engines are
       disposed when the app answers, before the answer is forwarded.
    4. The app raises or returns before reading ``lifespan.startup``: it does not
       implement lifespan, so the relay answers the server itself.
    5. The app raises after reading ``startup``: engines disposed, and the pending
       ``startup.failed`` or ``shutdown.failed`` sent with the error; re-raised.
    6. The app returns before the conversation is over: the relay finishes it.
    7. A terminal message the app sends after the relay has already answered (a
       framework reporting the failure the relay reported) is dropped: the server
       never gets two.  Sending ``startup.failed`` may raise (hypercorn does); the
       engines are disposed before it is sent.
    Whatever happens, the engines the relay started are disposed before it returns,
    from its own list (servers may clear ``state`` before shutdown).
    """

    def __init__(
        self,
        app: AnyASGIApp,
        databases: tuple[Database, ...],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        self._app = app
        self._databases = databases
        self._scope = scope
        self._receive = receive
        self._send = send
        self._started: list[Database] = []
        self._startup_received = False
        self._startup_answered = False
        self._startup_ok = False
        self._shutdown_received = False
        self._shutdown_answered = False

    async def run(self) -> None:
        try:
            try:
                await self._app(self._scope, self.receive, self.send)
            except Exception as exc:
                if self._startup_received:  # case 5
                    await self._answer_failure(exc)
                    raise
                logger.debug(  # case 4
                    "The wrapped app does not implement lifespan (%s); answering it for "
                    "the databases alone.",
                    type(exc).__name__,
                )
            await self._finish()  # cases 4 and 6
        finally:
            await self._stop_databases()

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "lifespan.startup":
            self._startup_received = True
            await self._start_databases()
        elif message["type"] == "lifespan.shutdown":
            self._shutdown_received = True
        return message

    async def send(self, message: Message) -> None:
        message_type = message["type"]
        if message_type in ("lifespan.startup.complete", "lifespan.startup.failed"):
            if self._startup_answered:  # case 7
                return
            if message_type == "lifespan.startup.failed":
                await self._stop_databases()
            else:
                self._startup_ok = True
            self._startup_answered = True
        elif message_type in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            if self._shutdown_answered:  # case 7
                return
            await self._stop_databases()
            self._shutdown_answered = True
        await self._send(message)

    async def _start_databases(self) -> None:
        for db in self._databases:
            try:
                await db._start()
            except Exception as exc:
                self._started.append(db)  # its engine may exist, with no connection
                await self._stop_databases()
                logger.error("Application startup failed: %s", exc)
                self._startup_answered = True
                await self._send({"type": "lifespan.startup.failed", "message": str(exc)})
                raise
            self._started.append(db)
        state = self._scope.get("state")
        if state is not None:
            state[STATE_KEY] = self._databases

    async def _stop_databases(self) -> None:
        started, self._started = self._started, []
        for db in started:
            try:
                await db.dispose()
            except Exception:
                logger.exception("Could not dispose the engine of %r.", db)

    async def _answer_failure(self, exc: Exception) -> None:
        await self._stop_databases()
        message = f"{type(exc).__name__}: {exc}"
        if not self._startup_answered:
            self._startup_answered = True
            await self._send({"type": "lifespan.startup.failed", "message": message})
        elif self._shutdown_received and not self._shutdown_answered:
            self._shutdown_answered = True
            await self._send({"type": "lifespan.shutdown.failed", "message": message})

    async def _finish(self) -> None:
        """Carry on the conversation the app left (or never began)."""
        if not self._startup_received:
            message = await self.receive()
            if message["type"] != "lifespan.startup":
                return
        if not self._startup_answered:
            await self.send({"type": "lifespan.startup.complete"})
        if not self._startup_ok:
            return
        while not self._shutdown_received:
            await self.receive()
        if not self._shutdown_answered:
            await self.send({"type": "lifespan.shutdown.complete"})
