"""Litestar with ``sync_to_thread=True`` handlers over a ``SyncDatabase`` (routes: sync_common).

Litestar runs those handlers in anyio's thread pool, and iterates a synchronous
``Stream`` there too; the session comes from ``asgi_sqla.litestar.provide_session``.
Exceptions are logged (``log_exceptions="always"``), so the server log shows the
``BlockingCallError`` of ``/misuse``.
"""

from __future__ import annotations

from litestar import Litestar, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.logging import LoggingConfig
from litestar.response import Stream
from sqlalchemy.orm import Session

from asgi_sqla import SQLAlchemyMiddleware
from asgi_sqla.litestar import provide_session

from .sync_common import app_parts, health_report, misuse, write_item, write_orphan

db, counter, streams = app_parts()


@get("/health")
async def health() -> dict[str, object]:
    return health_report(db)


@get("/pool")
async def pool() -> dict[str, int]:
    return counter.report()


@post("/items/{key:str}/{status:int}", sync_to_thread=True)
def create_item(key: str, status: int, session: NamedDependency[Session]) -> Response[str]:
    write_item(session, key)
    if status >= 400:
        raise HTTPException(status_code=status, detail="refused after the write")
    return Response(key, status_code=status)


@post("/orphans/{key:str}", sync_to_thread=True)
def create_orphan(key: str, session: NamedDependency[Session]) -> str:
    write_orphan(session, key)
    return "written"


@post("/streams/{key:str}", sync_to_thread=True)
def stream(key: str, session: NamedDependency[Session]) -> Stream:
    write_item(session, key)
    return Stream(streams.body(key), media_type="text/plain", status_code=200)


@post("/releases/{key:str}", status_code=200)
async def release(key: str) -> str:
    streams.release(key)
    return "released"


@get("/misuse")
async def misuse_session(session: NamedDependency[Session]) -> str:
    misuse(session)  # raises BlockingCallError: this handler is `async def`
    return "unreachable"  # pragma: no cover


app = SQLAlchemyMiddleware(
    Litestar(
        route_handlers=[health, pool, create_item, create_orphan, stream, release, misuse_session],
        dependencies={"session": provide_session(db)},
        logging_config=LoggingConfig(configure_root_logger=False, log_exceptions="always"),
    ),
    db,
)
