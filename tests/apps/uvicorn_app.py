"""A small Starlette app behind ``SQLAlchemyMiddleware``, served by uvicorn in test_uvicorn.py.

The database comes from ``DATABASE_URL``.  Every line the app and the package log goes to
stderr as ``LEVEL logger: message``, so the test can read what happened, and in which
order, from the server's log.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from asgi_sqla import Database, SQLAlchemyMiddleware

_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
for _name in ("asgi_sqla", "sqlalchemy.pool", "uvicorn_app"):
    _logger = logging.getLogger(_name)
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)  # sqlalchemy.pool logs "Pool disposed" at INFO
    _logger.propagate = False

logger = logging.getLogger("uvicorn_app")

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(64), nullable=False, unique=True),
)
parents = Table("parents", metadata, Column("id", Integer, primary_key=True))
#: Its foreign key is checked at COMMIT only, so a bad row makes the commit fail.
children = Table(
    "children",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "parent_id",
        Integer,
        ForeignKey("parents.id", deferrable=True, initially="DEFERRED"),
        nullable=False,
    ),
)

db = Database()  # DATABASE_URL


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with db.engine.begin() as connection:  # started by the middleware already
        await connection.run_sync(metadata.create_all)
    logger.info("app startup done")
    yield
    logger.info("app shutdown begins")


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


async def create_item(request: Request) -> Response:
    key = request.path_params["key"]
    await db.session.execute(items.insert().values(key=key))
    return PlainTextResponse(key, status_code=request.path_params["status"])


async def orphan(request: Request) -> Response:
    """Writes an item and a child without a parent: the deferred check fails the COMMIT."""
    session = db.session
    if db.engine.dialect.name == "sqlite":
        # SQLite checks foreign keys only when asked; outside a transaction, or it is a no-op.
        await session.execute(text("PRAGMA foreign_keys = ON"))
    await session.execute(items.insert().values(key=request.path_params["key"]))
    await session.execute(children.insert().values(parent_id=-1))
    return PlainTextResponse("created", status_code=201)


async def stream(request: Request) -> Response:
    key = request.path_params["key"]

    async def body() -> AsyncIterator[bytes]:
        yield b"one;"
        # After the response started: a new session, committed when the app returns.
        await db.session.execute(items.insert().values(key=key))
        yield b"two;"

    return StreamingResponse(body(), media_type="text/plain")


async def store(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            key = await websocket.receive_text()
            await db.session.execute(items.insert().values(key=key))
            await websocket.send_text(f"stored {key}")
    except WebSocketDisconnect:
        pass


app = SQLAlchemyMiddleware(
    Starlette(
        routes=[
            Route("/health", health),
            Route("/items/{key}/{status:int}", create_item, methods=["POST"]),
            Route("/orphans/{key}", orphan, methods=["POST"]),
            Route("/stream/{key}", stream),
            WebSocketRoute("/ws", store),
        ],
        lifespan=lifespan,
    ),
    db,
)
