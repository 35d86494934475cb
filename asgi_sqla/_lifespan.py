"""Lifespan: databases up before the app's startup, down after its shutdown."""

from __future__ import annotations

from ._database import BaseDatabase
from ._log import logger
from ._outcome import SingletonEnum
from .types import AnyASGIApp, Message, Receive, Scope, Send

STATE_KEY = "asgi_sqla.databases"
"""Where the databases are published in the lifespan ``state`` (copied by the server
into every request's scope as ``scope["state"]``).
"""


class _Phase(SingletonEnum):
    """Where one lifespan conversation is, as the relay sees it."""

    WAITING = "waiting for lifespan.startup"
    STARTING = "starting: lifespan.startup received, not answered"
    STARTUP_FAILED = "lifespan.startup.failed sent"
    STARTED = "lifespan.startup.complete sent"
    STOPPING = "stopping: lifespan.shutdown received, not answered"
    STOPPED = "lifespan.shutdown answered"


#: The conversation's moves, by message (received or sent).  A terminal message the
#: table does not allow in the current phase has been answered already: case 7.
_MOVES: dict[tuple[_Phase, str], _Phase] = {
    (_Phase.WAITING, "lifespan.startup"): _Phase.STARTING,
    (_Phase.STARTING, "lifespan.startup.complete"): _Phase.STARTED,
    (_Phase.STARTING, "lifespan.startup.failed"): _Phase.STARTUP_FAILED,
    (_Phase.STARTING, "lifespan.shutdown"): _Phase.STOPPING,
    (_Phase.STARTED, "lifespan.shutdown"): _Phase.STOPPING,
    (_Phase.STARTED, "lifespan.shutdown.complete"): _Phase.STOPPED,
    (_Phase.STARTED, "lifespan.shutdown.failed"): _Phase.STOPPED,
    (_Phase.STOPPING, "lifespan.shutdown.complete"): _Phase.STOPPED,
    (_Phase.STOPPING, "lifespan.shutdown.failed"): _Phase.STOPPED,
}
_ANSWERED = frozenset({_Phase.STARTUP_FAILED, _Phase.STARTED, _Phase.STOPPING, _Phase.STOPPED})
_STARTED_OK = frozenset({_Phase.STARTED, _Phase.STOPPING, _Phase.STOPPED})


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
        databases: tuple[BaseDatabase, ...],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        self._app = app
        self._databases = databases
        self._scope = scope
        self._receive = receive
        self._send = send
        self._started: list[BaseDatabase] = []
        self._phase = _Phase.WAITING

    def _move(self, message_type: str) -> bool:
        """Take the move ``message_type`` makes; False when the table has none."""
        phase = _MOVES.get((self._phase, message_type))
        if phase is None:
            return False
        self._phase = phase
        return True

    async def run(self) -> None:
        try:
            try:
                await self._app(self._scope, self.receive, self.send)
            except Exception as exc:
                if self._phase is not _Phase.WAITING:  # case 5
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
        if self._move(message["type"]) and self._phase is _Phase.STARTING:
            await self._start_databases()
        return message

    async def send(self, message: Message) -> None:
        message_type = message["type"]
        if message_type.startswith(("lifespan.startup.", "lifespan.shutdown.")):
            if not self._move(message_type):  # case 7: answered already
                return
            if self._phase is not _Phase.STARTED:  # failed, or shut down: engines go
                await self._stop_databases()
        await self._send(message)

    async def _start_databases(self) -> None:
        for db in self._databases:
            try:
                await db._start()
            except Exception as exc:
                self._started.append(db)  # its engine may exist, with no connection
                await self._stop_databases()
                # DEBUG, not ERROR: every server shows the startup.failed message sent
                # below (uvicorn and granian log it at ERROR, hypercorn raises it), so
                # a record of the same text at ERROR printed the failure twice.
                logger.debug("Application startup failed: %s", exc)
                self._move("lifespan.startup.failed")
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
                await db._stop()
            except Exception:
                logger.exception("Could not dispose the engine of %r.", db)

    async def _answer_failure(self, exc: Exception) -> None:
        await self._stop_databases()
        message = f"{type(exc).__name__}: {exc}"
        for answer in ("lifespan.startup.failed", "lifespan.shutdown.failed"):
            if self._phase in (_Phase.STARTING, _Phase.STOPPING) and self._move(answer):
                await self._send({"type": answer, "message": message})
                return

    async def _finish(self) -> None:
        """Carry on the conversation the app left (or never began)."""
        if self._phase is _Phase.WAITING:
            message = await self.receive()
            if message["type"] != "lifespan.startup":
                return
        if self._phase not in _ANSWERED:
            await self.send({"type": "lifespan.startup.complete"})
        if self._phase not in _STARTED_OK:
            return
        while self._phase is _Phase.STARTED:
            await self.receive()
        if self._phase is _Phase.STOPPING:
            await self.send({"type": "lifespan.shutdown.complete"})
