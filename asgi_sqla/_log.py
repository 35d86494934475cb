"""The package's logger, and what makes a client's text safe to put in a log line."""

from __future__ import annotations

import logging

__all__ = ["logger", "printable"]

#: Every record of the package goes to the ``asgi_sqla`` logger.
logger = logging.getLogger("asgi_sqla")


def printable(text: str) -> str:
    """``text`` with control characters escaped, so a request path cannot forge a log line.

    Servers decode ``%0A`` in the path into ``scope["path"]`` (uvicorn does).
    """
    if text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")
