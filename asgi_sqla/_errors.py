"""The package's exception types.

Every message names the likely fix.  Configuration mistakes are ``ValueError``
subclasses so that code catching the standard type keeps working.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = [
    "AsgiSqlaError",
    "BlockingCallError",
    "CommitFailedError",
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "DatabaseBusyError",
    "DatabaseStartupError",
    "NoSessionContextError",
    "ResponseCutShortError",
    "RollbackOnlyError",
    "SessionEndedError",
]


class AsgiSqlaError(Exception):
    """Base class of every exception raised by asgi_sqla."""


class ConfigurationError(AsgiSqlaError, ValueError):
    """A ``Database`` or ``SQLAlchemyMiddleware`` was configured in a way that cannot work."""


class DatabaseStartupError(AsgiSqlaError):
    """A database did not answer when the application started."""


class DatabaseBusyError(AsgiSqlaError):
    """A request was refused a connection: its database's ``admission_limit`` was reached.

    Raised where the request's session first needs a connection, after waiting
    ``admission_timeout`` seconds for a place; the middleware answers 503 with
    ``Retry-After``, as it does when the pool times out.
    """


class NoSessionContextError(AsgiSqlaError, LookupError):
    """``db.session`` was read where no request, websocket or ``db.scope()`` is active."""


class SessionEndedError(AsgiSqlaError, RuntimeError):
    """A session, or the request that owned it, has already ended."""


class ConcurrentSessionUseError(AsgiSqlaError, RuntimeError):
    """Two tasks used one ``AsyncSession``, or two threads one ``Session``, at once."""


class BlockingCallError(AsgiSqlaError, RuntimeError):
    """A ``SyncDatabase``'s session was used in the event loop's thread.

    Its calls wait for the database, and every other request on that loop would wait
    with them: use the session in a ``def`` endpoint (run in a worker thread), or pass
    ``block_event_loop=True`` where that is meant (tests on SQLite).
    """


class RollbackOnlyError(AsgiSqlaError, RuntimeError):
    """A commit of a rollback-only or read-only transaction, or a write in a route that
    reads in autocommit, was refused before anything was sent."""


class ResponseCutShortError(AsgiSqlaError, RuntimeError):
    """The request was cancelled as its transaction ended: only the status line went out.

    Raised into the application from ``send()`` when it (or a deadline around it)
    tries to send more after that: the status already sent is the truth about the
    transaction, and no other response may follow it.
    """


class CommitFailedError(AsgiSqlaError):
    """The transaction failed to commit, so the app's response was replaced.

    Raised into the application from ``send()`` (or ``receive()`` on a websocket) so
    that nothing after the failed commit, such as a streaming body or a background
    task, runs as if the write had succeeded.  The middleware has already logged the
    cause and answered the client; apps need not handle it.
    """


def exception_chain(exc: BaseException | None, limit: int = 8) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during, nearest first.

    Frameworks re-wrap errors (a 500 response made of a database error); the chains
    are short, and ``limit`` guards against a cycle.
    """
    seen = 0
    while exc is not None and seen < limit:
        yield exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
