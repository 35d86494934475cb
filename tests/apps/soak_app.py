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

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from sqlalchemy import func, select
from sqlalchemy import text as sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from asgi_sqla import Database

from .soak_shared import SCHEMA, engine_options, items, metadata, orphans, soak_app

_url = os.environ["DATABASE_URL"]
db = Database(_url, **engine_options(_url))


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


app = soak_app(db, write, lifespan)
