"""Starlette with ``def`` endpoints over a ``SyncDatabase`` (the routes of ``sync_common``).

Starlette runs a ``def`` endpoint in anyio's thread pool, and iterates a synchronous
body there too; ``db.session`` is the request's ``Session``.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_sqla import SQLAlchemyMiddleware

from .sync_common import app_parts, health_report, misuse, write_item, write_orphan

db, counter, streams = app_parts()


async def health(request: Request) -> Response:
    return JSONResponse(health_report(db))


async def pool(request: Request) -> Response:
    return JSONResponse(counter.report())


def create_item(request: Request) -> Response:
    key, status = request.path_params["key"], request.path_params["status"]
    write_item(db.session, key)
    if status >= 400:
        raise HTTPException(status_code=status)
    return PlainTextResponse(key, status_code=status)


def create_orphan(request: Request) -> Response:
    write_orphan(db.session, request.path_params["key"])
    return PlainTextResponse("written", status_code=201)


def stream(request: Request) -> Response:
    key = request.path_params["key"]
    write_item(db.session, key)
    return StreamingResponse(streams.body(key), media_type="text/plain")


async def release(request: Request) -> Response:
    streams.release(request.path_params["key"])
    return PlainTextResponse("released")


async def misuse_session(request: Request) -> Response:
    misuse(db.session)  # raises BlockingCallError: this endpoint is `async def`
    return PlainTextResponse("unreachable")  # pragma: no cover


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/pool", pool),
        Route("/items/{key}/{status:int}", create_item, methods=["POST"]),
        Route("/orphans/{key}", create_orphan, methods=["POST"]),
        Route("/streams/{key}", stream, methods=["POST"]),
        Route("/releases/{key}", release, methods=["POST"]),
        Route("/misuse", misuse_session),
    ],
    middleware=[Middleware(SQLAlchemyMiddleware, db)],
)
