"""One websocket: its unit of work, ended whenever the app waits, so idle sockets hold nothing.

Open sessions commit (by their database's policy) and close whenever the app waits in
``receive()`` for the next client message, and before a close or a denial response.
A close before ``websocket.accept`` is answered with HTTP 403 by the server (ASGI
websocket spec, "Close - send event"), so it is decided as a 403.  If a commit fails
the socket is closed with 1011 (or denied with a 500) and ``CommitFailedError`` is
raised into the app.
"""

from __future__ import annotations

from ._errors import CommitFailedError
from ._http import COMMIT_FAILED, DISCARDED, send_error_response
from ._log import logger
from ._unit import RECEIVE_WAITED, REQUEST_FINISHED, RESPONSE_STARTED, SessionContext
from .types import Message, Receive, Send

__all__ = ["WebSocketResponder"]


class WebSocketResponder:
    """Relays one websocket's messages, ending its unit of work between messages."""

    #: A websocket is never re-run (see ``HTTPResponder.retrying``).
    retrying = False
    accepted = False  # the app sent websocket.accept
    failed = False  # a commit failed: the app may receive and send nothing more

    def __init__(self, unit: SessionContext, receive: Receive, send: Send) -> None:
        self.unit = unit
        self._receive = receive
        self._send = send

    async def receive(self) -> Message:
        if self.failed:
            raise CommitFailedError(DISCARDED)
        unit = self.unit
        if unit.has_sessions and unit.ends_on_receive:
            await self._end(None, "next message", reason=RECEIVE_WAITED)
        return await self._receive()

    async def send(self, message: Message) -> None:
        if self.failed:
            raise CommitFailedError(DISCARDED)
        message_type = message["type"]
        if message_type == "websocket.accept":
            self.accepted = True
        elif self.unit.has_sessions:
            if message_type == "websocket.close":
                status = None if self.accepted else 403
                await self._end(status, "close", reason=RESPONSE_STARTED)
            elif message_type == "websocket.http.response.start":  # the denial extension
                status = message["status"]
                await self._end(status, f"{status} denial", reason=RESPONSE_STARTED)
        await self._send(message)

    async def _end(self, status: int | None, replaced: str, *, reason: str) -> None:
        outcome = await self.unit.end(status, reason=reason)
        if not outcome.failed:
            return
        self.failed = True
        denial = replaced.endswith("denial")
        sent = "a 500 denial response" if denial else "a 1011 close"
        text = COMMIT_FAILED.format(sent=sent, replaced=replaced)
        # Logged before the answer is sent: sending fails when the client has gone,
        # and the failed commit must be on record either way.
        logger.error(text, exc_info=outcome.error)
        try:
            if denial:
                await send_error_response(self._send, "websocket.http.response")
            else:
                await self._send({"type": "websocket.close", "code": 1011, "reason": ""})
        except Exception:  # the client has gone (servers raise OSError or RuntimeError)
            logger.debug("Could not tell the websocket client that the commit failed.")
        raise CommitFailedError(text) from outcome.error

    async def app_raised(self, exc: Exception) -> bool:
        """Roll back after the app raised; True when the error was already answered."""
        if self.unit.has_sessions:
            await self.unit.close(reason=REQUEST_FINISHED, failed=True)
        return self.failed

    async def app_returned(self) -> None:
        """Commit what the app left open when it returned normally."""
        if self.unit.has_sessions:
            outcome = await self.unit.close(reason=REQUEST_FINISHED)
            if outcome.failed:
                logger.error(
                    "A websocket's last transaction failed to commit after the app returned.",
                    exc_info=outcome.error,
                )
