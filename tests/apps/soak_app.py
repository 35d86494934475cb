"""The app of the fault-injection soak (tests/test_soak.py) and tests/test_faults.py.

Served by uvicorn, with the database in ``DATABASE_URL`` (a PostgreSQL URL with a
password).  ``POST /write?key=K&fault=F`` writes one row keyed ``K`` and then misbehaves
as ``F`` says (see :func:`write`); the client compares what it was told with the rows.
``GET /pool`` tells how many connections the pool has checked out, ``GET /health``
answers without touching the database.

The pool is small on purpose (``SOAK_POOL_SIZE``, default 5, no overflow, a
``SOAK_POOL_TIMEOUT`` of 0.5 s): with more concurrent clients than connections it runs
dry, and the middleware answers 503 with Retry-After.  ``pool_pre_ping`` is on unless
``SOAK_PRE_PING=0``, so that the app recovers by itself after the database restarts.

The app creates its schema at startup (again harmlessly on a later start).  Every line
the app and the package log goes to stderr, where the test reads it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from sqlalchemy import Column, Float, ForeignKey, Integer, MetaData, String, Table, func, select
from sqlalchemy import text as sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_sqla import Database, SQLAlchemyMiddleware
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


def _database() -> Database:
    url = os.environ["DATABASE_URL"]
    # The README's advice: let the server notice a vanished client quickly.
    check = "500"
    if url.startswith("postgresql+asyncpg"):
        settings = {"application_name": "soak", "client_connection_check_interval": check}
        connect_args: dict[str, object] = {"server_settings": settings}
    else:
        connect_args = {
            "application_name": "soak",
            "options": f"-c client_connection_check_interval={check}",
        }
    return Database(
        url,
        pool_size=int(os.environ.get("SOAK_POOL_SIZE", "5")),
        max_overflow=0,
        pool_timeout=float(os.environ.get("SOAK_POOL_TIMEOUT", "0.5")),
        pool_pre_ping=os.environ.get("SOAK_PRE_PING", "1") == "1",
        connect_args=connect_args,
    )


db = _database()


class SoakError(RuntimeError):
    """What the app raises on purpose (``fault=raise-before`` / ``raise-after``)."""


#: Serializable pairs: the requests of a group wait for each other after their insert.
_groups: dict[str, anyio.Event] = {}


async def _meet(group: str) -> None:
    """Wait (up to 0.2 s) until the other request of ``group`` has written its row."""
    event = _groups.get(group)
    if event is None:
        event = _groups[group] = anyio.Event()
        with anyio.move_on_after(0.2):  # the partner may have got a 503 instead
            await event.wait()
    else:
        event.set()
    _groups.pop(group, None)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with db.engine.begin() as connection:  # started by the middleware already
        await connection.run_sync(metadata.create_all)
        for statement in SCHEMA:
            await connection.exec_driver_sql(statement)
    yield


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


async def pool(request: Request) -> Response:
    pool = db.engine.sync_engine.pool
    return JSONResponse(
        {"checked_out": pool.checkedout(), "size": pool.size()}  # type: ignore[attr-defined]
    )


async def write(request: Request) -> Response:
    """Write the row ``key``, then do what ``fault`` says.

    ``ms`` is a duration in milliseconds; the answer is 201 unless the fault changes it.

    * ``none``: nothing more.
    * ``commit-fails``: also a row violating a deferred foreign key: the COMMIT fails.
    * ``serialize``: SERIALIZABLE; count the rows of ``group``, write, wait for the
      other request of the group: one of the two cannot commit.
    * ``raise-before`` / ``raise-after``: raise before the response starts / while
      streaming its body.
    * ``sleep``: sleep ``ms`` (the client disconnects meanwhile).
    * ``stream``: a body of 10 chunks, ``ms`` apart (the client leaves mid-body).
    * ``kill-query``: a statement of ``ms`` with ``application_name`` set to ``tag``
      (the test kills the backend during it).
    * ``slow-commit``: the COMMIT takes ``ms`` (a deferred trigger), with
      ``application_name`` ``tag`` meanwhile: the test kills it, or a ``deadline_ms``
      expires during it (see :class:`Deadline`).
    * ``timeout``: a statement under ``anyio.fail_after(ms)``: cancelled, answered 504.
    """
    params = request.query_params
    key = params["key"]
    fault = params.get("fault", "none")
    seconds = float(params.get("ms", "0")) / 1000
    session = db.session
    row: dict[str, object] = {"key": key, "grp": params.get("group")}
    if fault == "serialize":
        await session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
        group = items.c.grp == params["group"]
        await session.scalar(select(func.count()).select_from(items).where(group))
    if fault == "slow-commit":
        row.update(commit_delay=seconds, tag=params.get("tag"))
    await session.execute(items.insert().values(**row))

    if fault == "commit-fails":
        await session.execute(orphans.insert().values(parent_id=-1))
    elif fault == "serialize":
        await _meet(params["group"])
    elif fault == "raise-before":
        raise SoakError(f"soak: {key} raised before the response started")
    elif fault == "raise-after":
        return StreamingResponse(_raise_after_first_chunk(key), media_type="text/plain")
    elif fault == "sleep":
        await anyio.sleep(seconds)
    elif fault == "stream":
        return StreamingResponse(_slow_chunks(key, seconds), media_type="text/plain")
    elif fault == "kill-query":
        statement = sql("SELECT set_config('application_name', :tag, true), pg_sleep(:s)")
        await session.execute(statement, {"tag": params["tag"], "s": seconds})
    elif fault == "timeout":
        try:
            with anyio.fail_after(seconds):
                await session.execute(sql("SELECT pg_sleep(5)"))
        except TimeoutError:
            return PlainTextResponse("the handler timed out", status_code=504)
    return PlainTextResponse(key, status_code=201)


async def _raise_after_first_chunk(key: str) -> AsyncIterator[bytes]:
    yield b"first chunk;"
    raise SoakError(f"soak: {key} raised after the response started")


async def _slow_chunks(key: str, seconds: float) -> AsyncIterator[bytes]:
    for number in range(10):
        yield f"{key} chunk {number};".encode()
        await anyio.sleep(seconds)


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


app = SQLAlchemyMiddleware(
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
