"""What the soak's two apps share: the schema, the engine options, the request deadline,
the routes other than ``POST /write`` and the app around them.

``tests/apps/soak_app.py`` (async endpoints on a ``Database``) and
``tests/apps/soak_sync_app.py`` (``def`` endpoints on a ``SyncDatabase``) answer the
same requests of tests/test_soak.py over the same tables.  Importing this module sends
the log lines of ``asgi_sqla`` and ``sqlalchemy.pool`` to stderr, where the test reads
them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
from sqlalchemy import Column, Float, ForeignKey, Integer, MetaData, String, Table
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_sqla import Database, SQLAlchemyMiddleware, SyncDatabase
from asgi_sqla.types import ASGIApp, Message, Receive, Scope, Send

_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
for _name, _level in (("asgi_sqla", logging.DEBUG), ("sqlalchemy.pool", logging.INFO)):
    _logger = logging.getLogger(_name)
    _logger.addHandler(_handler)
    _logger.setLevel(_level)
    _logger.propagate = False

metadata = MetaData()
#: One row per request.  ``commit_delay`` seconds are spent in the COMMIT (a deferred
#: trigger), during which the backend's ``application_name`` is ``tag``, so that the
#: test can find it in ``pg_stat_activity`` and kill it mid-commit.
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(64), nullable=False, unique=True),
    Column("grp", String(64)),
    Column("commit_delay", Float),
    Column("tag", String(64)),
)
parents = Table("parents", metadata, Column("id", Integer, primary_key=True))
#: Its foreign key is checked at COMMIT only: a child without a parent fails the COMMIT.
orphans = Table(
    "orphans",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "parent_id",
        Integer,
        ForeignKey("parents.id", deferrable=True, initially="DEFERRED"),
        nullable=False,
    ),
)

#: Run at startup after ``metadata.create_all``.
SCHEMA = [
    """
    CREATE OR REPLACE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.tag IS NOT NULL THEN
            PERFORM set_config('application_name', NEW.tag, true);
        END IF;
        PERFORM pg_sleep(NEW.commit_delay);
        RETURN NULL;
    END $$
    """,
    "DROP TRIGGER IF EXISTS slow_commit ON items",
    """
    CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON items
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.commit_delay > 0) EXECUTE FUNCTION slow_commit()
    """,
]

#: ``application_name`` prefixes of backends the test kills: mid-statement, mid-commit.
KILL_QUERY_TAG = "kill-query:"
KILL_COMMIT_TAG = "kill-commit:"


def engine_options(url: str) -> dict[str, Any]:
    """The soak's database options for ``url``: a small pool that runs dry, and more.

    ``SOAK_POOL_SIZE`` connections (default 5), no overflow, a ``SOAK_POOL_TIMEOUT`` of
    0.5 s; ``pool_pre_ping`` unless ``SOAK_PRE_PING=0``; the README's advice: the
    server notices a vanished client within 0.5 s (``client_connection_check_interval``);
    and the failover guide's: a COMMIT whose connection was lost is checked
    (``confirm_lost_commits``), so that no answer claims what did not happen.
    """
    check = "500"
    if url.startswith("postgresql+asyncpg"):
        settings = {"application_name": "soak", "client_connection_check_interval": check}
        connect_args: dict[str, object] = {"server_settings": settings}
    else:  # psycopg (async or not) and psycopg2 take libpq's options
        connect_args = {
            "application_name": "soak",
            "options": f"-c client_connection_check_interval={check}",
        }
    return {
        "pool_size": int(os.environ.get("SOAK_POOL_SIZE", "5")),
        "max_overflow": 0,
        "pool_timeout": float(os.environ.get("SOAK_POOL_TIMEOUT", "0.5")),
        "pool_pre_ping": os.environ.get("SOAK_PRE_PING", "1") == "1",
        "connect_args": connect_args,
        "confirm_lost_commits": 10.0,
    }


class Deadline:
    """A request deadline, as apps often add one: 504 if the app takes too long.

    Active when the query string has ``deadline_ms``.  It sits inside
    ``SQLAlchemyMiddleware``, as a Starlette ``middleware=[...]`` entry listed after it
    would, so its deadline covers the app's response start, and with it the COMMIT.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deadline = _deadline(scope)
        if deadline is None:
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_track(message: Message) -> None:
            nonlocal started
            await send(message)
            if message["type"] == "http.response.start":
                started = True

        try:
            with anyio.fail_after(deadline):
                await self.app(scope, receive, send_and_track)
        except TimeoutError:
            if started:
                raise
            await PlainTextResponse("deadline exceeded", status_code=504)(scope, receive, send)


def _deadline(scope: Scope) -> float | None:
    if scope["type"] != "http":
        return None
    for pair in scope["query_string"].split(b"&"):
        name, _, value = pair.partition(b"=")
        if name == b"deadline_ms":
            return float(value) / 1000
    return None


def soak_app(
    db: Database | SyncDatabase,
    write: Callable[[Request], Any],
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]],
) -> ASGIApp:
    """The soak's app on ``db``: ``write`` serves ``POST /write``, under :class:`Deadline`.

    ``GET /health`` answers without touching the database; ``GET /pool`` tells how many
    connections the pool has checked out, and its size.  The middleware answers 503
    with ``Retry-After: 1`` when the pool runs dry.
    """

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def pool(request: Request) -> Response:
        engine = db.engine
        pool = (engine.sync_engine if isinstance(engine, AsyncEngine) else engine).pool
        return JSONResponse(
            {"checked_out": pool.checkedout(), "size": pool.size()}  # type: ignore[attr-defined]
        )

    return SQLAlchemyMiddleware(
        Deadline(
            Starlette(
                routes=[
                    Route("/health", health),
                    Route("/pool", pool),
                    Route("/write", write, methods=["POST"]),
                ],
                lifespan=lifespan,
            )
        ),
        db,
        retry_after=1,
    )
