"""FastAPI integration: the request's session as a dependency.

Mount the middleware as FastAPI mounts any ASGI middleware, and declare the session
as a parameter where that reads better than ``db.session``::

    from typing import Annotated

    from fastapi import Depends, FastAPI
    from sqlalchemy.ext.asyncio import AsyncSession

    from asgi_sqla import Database, SQLAlchemyMiddleware
    from asgi_sqla.fastapi import session_dependency

    db = Database("postgresql+asyncpg://app@db/app")
    DBSession = Annotated[AsyncSession, Depends(session_dependency(db))]

    app = FastAPI()
    app.add_middleware(SQLAlchemyMiddleware, db)

    @app.get("/users")
    async def list_users(session: DBSession) -> list[str]:
        return list(await session.scalars(select(User.name)))

The dependency returns ``db.session``: the parameter and ``db.session`` are the same
session, one per request either way, committed or rolled back by the middleware
before the status line is sent.  Like ``db.session`` it is lazy: a request that
declares it but runs no statement checks out no connection.

The middleware ends the transaction, so the dependency does not: it is a plain
``async def`` (run on the event loop, not in the thread pool), not a dependency with
``yield``, and it must not be wrapped in one that commits after ``yield``.  Since
FastAPI 0.118 the code after ``yield`` runs after the response was sent, when the
request's session has already ended (``SessionEndedError``).  For the same reason,
work that runs after the response started (a background task, a streaming body)
reads ``db.session`` again, for a session of its own, instead of keeping the injected
one.  In a websocket endpoint the injected session ends at ``accept()``, which waits
for the client's connect message: use it before accepting, and ``db.session`` after.

For a ``SyncDatabase`` the dependency gives its ``Session``, for ``def`` endpoints as
FastAPI's SQL tutorial writes them: replace the tutorial's ``get_session`` (a ``yield``
dependency opening ``Session(engine)``) with it and keep every endpoint as it is::

    from sqlmodel import Session

    db = SyncDatabase("postgresql+psycopg://app@db/app", session_class=Session)
    SessionDep = Annotated[Session, Depends(session_dependency(db))]

    @app.post("/heroes/")
    def create_hero(hero: Hero, session: SessionDep) -> Hero:
        session.add(hero)
        session.flush()  # the middleware commits before the status line is sent
        return hero

It is still an ``async def`` dependency (handing out the lazy session takes no
connection and needs no thread), and the endpoint's statements run in FastAPI's
worker thread.

This module imports nothing from FastAPI; it is imported only by apps that use it.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ._database import BaseDatabase, Database
from ._errors import NoSessionContextError
from ._syncdb import SyncDatabase

__all__ = ["session_dependency"]

_A = TypeVar("_A", bound=AsyncSession)
_S = TypeVar("_S", bound=Session)

_COLLECTED = (
    "The Database of this dependency was garbage-collected: nothing but the dependency "
    "referred to it, so no SQLAlchemyMiddleware serves it. Keep it in a module-level "
    "variable (db = Database(url)) and pass that to SQLAlchemyMiddleware(app, db)."
)

_dependencies: weakref.WeakKeyDictionary[BaseDatabase, Callable[[], Awaitable[Any]]] = (
    weakref.WeakKeyDictionary()
)


@overload
def session_dependency(db: Database[_A]) -> Callable[[], Awaitable[_A]]: ...
@overload
def session_dependency(db: SyncDatabase[_S]) -> Callable[[], Awaitable[_S]]: ...
def session_dependency(db: BaseDatabase) -> Callable[[], Awaitable[Any]]:
    """Return the FastAPI dependency giving ``db``'s session in the current request.

    Use it as ``Annotated[AsyncSession, Depends(session_dependency(db))]``, or with a
    ``SyncDatabase`` as ``Annotated[Session, Depends(session_dependency(db))]``.  Every
    call with the same ``db`` returns the same function, so it can also be a key of
    ``app.dependency_overrides``.  Outside a request wrapped by
    ``SQLAlchemyMiddleware(app, db)`` the dependency raises ``NoSessionContextError``,
    as ``db.session`` does.

    :param db: A ``Database`` or ``SyncDatabase`` passed to the app's
        ``SQLAlchemyMiddleware``.
    """
    dependency = _dependencies.get(db)
    if dependency is None:
        # A weak reference, so that the cached function does not keep ``db`` alive.
        db_ref = weakref.ref(db)

        async def request_session() -> Any:
            database = db_ref()
            if database is None:  # no app can serve a Database that is gone
                raise NoSessionContextError(_COLLECTED)
            return database.session

        dependency = _dependencies[db] = request_session
    return dependency
