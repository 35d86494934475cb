"""The package's logger, and what makes a client's text safe to put in a log line."""

from __future__ import annotations

import logging
import time

__all__ = ["Throttle", "logger", "printable"]

#: Every record of the package goes to the ``asgi_sqla`` logger.
logger = logging.getLogger("asgi_sqla")


def printable(text: str) -> str:
    """``text`` with control characters escaped, so a request path cannot forge a log line.

    Servers decode ``%0A`` in the path into ``scope["path"]`` (uvicorn does).
    """
    if text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


class Throttle:
    """Lets one record of each kind through per ``interval`` seconds, and counts the rest.

    Used from the event loop's thread only.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def allow(self, kind: str) -> int | None:
        """None to leave this record out; else how many of its kind were left out before it."""
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._skipped.pop(kind, 0)
