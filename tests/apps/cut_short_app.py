"""A Starlette app whose streaming body writes a row per chunk, served by uvicorn in test_edges.py.

``/stream/{prefix}/{rows}/{count}`` sends ``count`` chunks; before each of the first
``rows`` it inserts the item ``{prefix}-{n}`` through ``db.session`` (read again for
every chunk), so every row is written after the status line went out.  The chunks
after those carry no write: a client that leaves then finds the stream waiting to
send, not inside a statement.  ``/pool`` answers how many connections are
checked out, so that the test can tell when the request's session has ended.  The
database comes from ``DATABASE_URL``; the ``items`` table is made at startup.
"""

from __future__ import annotations

import asyncio
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
    rows = request.path_params["rows"]
    count = request.path_params["count"]

    async def body() -> AsyncIterator[bytes]:
        for n in range(count):
            if n < rows:
                await db.session.execute(items.insert().values(key=f"{prefix}-{n}"))
            else:
                # A checkpoint, as making a real chunk would be: once the client has
                # gone uvicorn's send returns at once, and a loop that never awaits
                # would keep the server from ever telling Starlette so.
                await asyncio.sleep(0)
            # 4 KiB a chunk: a client that stops reading soon fills the socket buffers.
            yield b"x" * 4095 + b";"

    return StreamingResponse(body(), media_type="text/plain")


app = SQLAlchemyMiddleware(
    Starlette(
        routes=[
            Route("/health", health),
            Route("/pool", pool),
            Route("/stream/{prefix}/{rows:int}/{count:int}", stream),
        ],
        lifespan=lifespan,
    ),
    db,
)
