"""A Starlette app behind ``SQLAlchemyMiddleware``, served by several worker processes.

Run by tests/test_workers.py under ``uvicorn --workers 2`` and gunicorn with uvicorn
workers (``--preload`` too).  ``db = Database()`` at module level, as an app would write
it: the object is made at import, the engine in each worker's lifespan.

What lets the test tell the processes apart:

* every response carries ``x-worker-pid``, the 500 that replaces a failed commit too;
* every connection is opened with ``application_name`` ``workers_app-<pid of the process
  that opened it>`` (PostgreSQL shows it in ``pg_stat_activity``), so a connection
  inherited across ``fork`` would show the parent's pid;
* log lines read ``LEVEL <pid> logger: message``.

The tables are made by the test before the server starts: two workers creating them at
once would race.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Column, Engine, ForeignKey, Integer, MetaData, String, Table, event, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_sqla import Database, SQLAlchemyMiddleware
from asgi_sqla.types import ASGIApp, Message, Receive, Scope, Send

_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(levelname)s %(process)d %(name)s: %(message)s"))
for _name in ("asgi_sqla", "sqlalchemy.pool", "workers_app"):
    _logger = logging.getLogger(_name)
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)  # sqlalchemy.pool logs "Pool disposed" at INFO
    _logger.propagate = False

logger = logging.getLogger("workers_app")

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

db = Database()  # DATABASE_URL (postgresql+asyncpg://)


@event.listens_for(Engine, "do_connect")
def _name_the_connection(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
    # DialectEvents.do_connect, for every engine of the process: the pid is read when the
    # connection is opened, not at import (with --preload, the import is the master's).
    # asyncpg.connect(server_settings=...) sets it at the connection's startup.
    settings = cparams.setdefault("server_settings", {})
    settings["application_name"] = f"workers_app-{os.getpid()}"


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    logger.info("startup done")
    yield
    logger.info("shutdown begins")


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


async def whoami(request: Request) -> Response:
    """This worker's pid, the ``id()`` of its engine and pool, and its database backend."""
    row = (
        await db.session.execute(
            text("SELECT pg_backend_pid(), current_setting('application_name')")
        )
    ).one()
    engine = db.engine
    return JSONResponse(
        {
            "pid": os.getpid(),
            "engine": id(engine),
            "pool": id(engine.sync_engine.pool),
            "backend": row[0],
            "application_name": row[1],
        }
    )


async def create_item(request: Request) -> Response:
    await db.session.execute(items.insert().values(key=request.path_params["key"]))
    return PlainTextResponse("created", status_code=201)


async def orphan(request: Request) -> Response:
    """Writes an item and a child without a parent: the deferred check fails the COMMIT."""
    await db.session.execute(items.insert().values(key=request.path_params["key"]))
    await db.session.execute(children.insert().values(parent_id=-1))
    return PlainTextResponse("created", status_code=201)


def with_worker_pid(app: ASGIApp) -> ASGIApp:
    """``app``, whose responses carry the ``x-worker-pid`` header."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Read per response: with --preload, the import ran in the master.
                pid = str(os.getpid()).encode()
                headers = [*message.get("headers", []), (b"x-worker-pid", pid)]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_with_pid)

    return wrapped


app = with_worker_pid(
    SQLAlchemyMiddleware(
        Starlette(
            routes=[
                Route("/health", health),
                Route("/whoami", whoami),
                Route("/items/{key}", create_item, methods=["POST"]),
                Route("/orphans/{key}", orphan, methods=["POST"]),
            ],
            lifespan=lifespan,
        ),
        db,
    )
)
