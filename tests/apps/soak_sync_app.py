"""The soak's app with ``def`` endpoints on a ``SyncDatabase`` (tests/test_soak.py).

The twin of ``tests/apps/soak_app.py``: the same requests, tables, pool and request
deadline (``tests/apps/soak_shared.py``), with the database in ``DATABASE_URL`` given
a synchronous driver (``postgresql+psycopg://``, psycopg 3 used synchronously, or
``postgresql+psycopg2://``).  Starlette runs ``POST /write`` in a worker thread of
anyio's (40 of them, fewer than the soak's clients); the middleware ends each session
in a thread of the package's own.  What the async app does with awaits, this one does
as ``def`` code does: ``time.sleep``, ``threading.Event``, a ``statement_timeout``
instead of a cancel scope, generators that Starlette iterates in threads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
from sqlalchemy import func, select
from sqlalchemy import text as sql
from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from asgi_sqla import SyncDatabase

from .soak_shared import SCHEMA, engine_options, items, metadata, orphans, soak_app

_url = os.environ["DATABASE_URL"]
db = SyncDatabase(_url, **engine_options(_url))


class SoakError(RuntimeError):
    """What the app raises on purpose (``fault=raise-before`` / ``raise-after``)."""


#: Serializable pairs: the requests of a group wait for each other after their insert.
_groups: dict[str, threading.Event] = {}
_groups_lock = threading.Lock()


def _meet(group: str) -> None:
    """Wait (up to 0.2 s) until the other request of ``group`` has written its row."""
    with _groups_lock:
        event = _groups.get(group)
        first = event is None
        if event is None:
            event = _groups[group] = threading.Event()
    if first:
        event.wait(0.2)  # the partner may have got a 503 instead
    else:
        event.set()
    with _groups_lock:
        _groups.pop(group, None)


def _create_schema() -> None:
    with db.engine.begin() as connection:  # started by the middleware already
        metadata.create_all(connection)
        for statement in SCHEMA:
            connection.exec_driver_sql(statement)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await anyio.to_thread.run_sync(_create_schema)
    yield


def write(request: Request) -> Response:
    """Write the row ``key``, then do what ``fault`` says (as ``soak_app.write`` does).

    * ``sleep``: ``time.sleep(ms)``, the request's own slow work.
    * ``serialize``: the partner is awaited on a ``threading.Event``.
    * ``timeout``: a statement under a ``statement_timeout`` of ``ms``: the server
      cancels it, and the handler answers 504.
    * ``stream`` and ``raise-after``: plain generators, iterated in worker threads.

    The other faults are as in the async app.
    """
    params = request.query_params
    key = params["key"]
    fault = params.get("fault", "none")
    seconds = float(params.get("ms", "0")) / 1000
    session = db.session
    row: dict[str, object] = {"key": key, "grp": params.get("group")}
    if fault == "serialize":
        session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
        group = items.c.grp == params["group"]
        session.scalar(select(func.count()).select_from(items).where(group))
    if fault == "slow-commit":
        row.update(commit_delay=seconds, tag=params.get("tag"))
    session.execute(items.insert().values(**row))

    if fault == "commit-fails":
        session.execute(orphans.insert().values(parent_id=-1))
    elif fault == "serialize":
        _meet(params["group"])
    elif fault == "raise-before":
        raise SoakError(f"soak: {key} raised before the response started")
    elif fault == "raise-after":
        return StreamingResponse(_raise_after_first_chunk(key), media_type="text/plain")
    elif fault == "sleep":
        time.sleep(seconds)
    elif fault == "stream":
        return StreamingResponse(_slow_chunks(key, seconds), media_type="text/plain")
    elif fault == "kill-query":
        statement = sql("SELECT set_config('application_name', :tag, true), pg_sleep(:s)")
        session.execute(statement, {"tag": params["tag"], "s": seconds})
    elif fault == "timeout":
        timeout = sql("SELECT set_config('statement_timeout', :ms, true)")
        session.execute(timeout, {"ms": str(round(seconds * 1000))})
        try:
            session.execute(sql("SELECT pg_sleep(5)"))
        except OperationalError:  # QueryCanceled: the transaction is aborted, rolled back
            return PlainTextResponse("the handler timed out", status_code=504)
    return PlainTextResponse(key, status_code=201)


def _raise_after_first_chunk(key: str) -> Iterator[bytes]:
    yield b"first chunk;"
    raise SoakError(f"soak: {key} raised after the response started")


def _slow_chunks(key: str, seconds: float) -> Iterator[bytes]:
    for number in range(10):
        yield f"{key} chunk {number};".encode()
        time.sleep(seconds)


app = soak_app(db, write, lifespan)
