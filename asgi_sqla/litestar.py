"""Litestar integration: the request's session as a dependency provider.

Wrap the ``Litestar`` application object itself, so that the middleware also sees the
``lifespan`` scope (middleware given to ``Litestar(middleware=[...])`` runs per route
and never does), and declare the session as a handler parameter where that reads
better than ``db.session``::

    from litestar import Litestar, get
    from litestar.di import NamedDependency
    from sqlalchemy.ext.asyncio import AsyncSession

    from asgi_sqla import Database, SQLAlchemyMiddleware
    from asgi_sqla.litestar import provide_session

    db = Database("postgresql+asyncpg://app@db/app")

    @get("/users")
    async def list_users(session: NamedDependency[AsyncSession]) -> list[str]:
        return list(await session.scalars(select(User.name)))

    app = SQLAlchemyMiddleware(
        Litestar([list_users], dependencies={"session": provide_session(db)}), db
    )

``NamedDependency`` marks the parameter as a dependency, as Litestar 2.23 and later
ask (older versions find it by its name alone: annotate it ``AsyncSession``).  The
provider returns ``db.session``: the parameter and ``db.session`` are the same
session, one per request or websocket either way, committed or rolled back by the
middleware before the status line is sent.  Like ``db.session`` it is lazy: a
request that declares it but runs no statement checks out no connection.

The middleware ends the transaction, so the provider does not: it is a plain
``async def``, run on the event loop (in a worker thread an ``AsyncSession`` cannot be
used), not a generator dependency that commits after ``yield``.  Litestar runs the
code after ``yield`` once the response was sent, when the request's session has
already ended (``SessionEndedError``).  For the same reason a background task, a
``Stream`` body or the next websocket message reads ``db.session`` again instead of
keeping the injected session.

Litestar decides the status of its exceptions (``HTTPException`` and its subclasses,
validation errors as 400, any other exception as 500) in its own exception
middleware, inside the application object: the middleware sees the resulting
response, and its status decides the outcome.  Background tasks
(``Response(background=...)``) run after the response was sent, so they never run
after a failed commit: the middleware raises ``CommitFailedError`` into the app from
``send()`` and Litestar skips them.

With a ``SyncDatabase`` the provider gives its ``Session``, for synchronous handlers
(``@get(..., sync_to_thread=True)``), which Litestar runs in a worker thread: the
provider itself stays ``async def`` (handing out the lazy session needs no thread).

This module imports Litestar; it is imported only by apps that use it, never by the
rest of the package.
"""

from __future__ import annotations

from litestar.di import Provide
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ._database import BaseDatabase

__all__ = ["provide_session"]


def provide_session(db: BaseDatabase) -> Provide:
    """Return a Litestar ``Provide`` giving ``db``'s session in the current connection.

    Register it under the parameter name handlers use, on the app, a router, a
    controller or a handler: ``dependencies={"session": provide_session(db)}``.
    Outside a request or websocket wrapped by ``SQLAlchemyMiddleware(app, db)`` the
    dependency raises ``NoSessionContextError``, as ``db.session`` does.

    :param db: A ``Database`` or ``SyncDatabase`` passed to the ``SQLAlchemyMiddleware``
        wrapping the app.
    """

    async def provide_db_session() -> AsyncSession | Session:
        return db.session

    return Provide(provide_db_session)
