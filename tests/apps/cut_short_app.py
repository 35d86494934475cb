"""A Starlette app whose streaming body writes a row per chunk, served by uvicorn in test_edges.py.

``/stream/{prefix}/{count}`` sends ``count`` chunks; before each it inserts the item
``{prefix}-{n}`` through ``db.session`` (read again for every chunk), so every row is
written after the status line went out.  ``/pool`` answers how many connections are
checked out, so that the test can tell when the request's session has ended.  The
database comes from ``DATABASE_URL``; the ``items`` table is made at startup.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import Column, Integer, MetaData, String, Table
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_sqla import Database, SQLAlchemyMiddleware

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(64), nullable=False, unique=True),
)

db = Database()  # DATABASE_URL


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with db.engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


async def pool(request: Request) -> Response:
    return PlainTextResponse(str(db.pool_status().checked_out))


async def stream(request: Request) -> Response:
    prefix = request.path_params["prefix"]
    count = request.path_params["count"]

    async def body() -> AsyncIterator[bytes]:
        for n in range(count):
            await db.session.execute(items.insert().values(key=f"{prefix}-{n}"))
            # 4 KiB a chunk: a client that stops reading soon fills the socket buffers.
            yield b"x" * 4095 + b";"

    return StreamingResponse(body(), media_type="text/plain")


app = SQLAlchemyMiddleware(
    Starlette(
        routes=[
            Route("/health", health),
            Route("/pool", pool),
            Route("/stream/{prefix}/{count:int}", stream),
        ],
        lifespan=lifespan,
    ),
    db,
)
