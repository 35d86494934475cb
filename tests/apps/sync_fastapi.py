"""``examples/sqlmodel_app.py`` with the routes of ``sync_common`` added, for the tests.

The example's app as it is (its heroes, its ``def`` dependency with ``yield``, its
``/health``), plus ``def`` endpoints taking the example's ``SessionDep``.  On SQLite,
foreign keys are turned on before the first connection, so that an orphan's COMMIT
fails there too.
"""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import PlainTextResponse, StreamingResponse

from examples.sqlmodel_app import SessionDep, app, db

from .sync_common import app_parts, misuse, write_item, write_orphan

_, counter, streams = app_parts(db)


@app.get("/pool")
async def pool() -> dict[str, int]:
    return counter.report()


@app.post("/items/{key}/{status}", response_class=PlainTextResponse)
def create_item(key: str, status: int, session: SessionDep) -> PlainTextResponse:
    write_item(session, key)
    if status >= 400:
        raise HTTPException(status_code=status, detail="refused after the write")
    return PlainTextResponse(key, status_code=status)


@app.post("/orphans/{key}", status_code=201)
def create_orphan(key: str, session: SessionDep) -> str:
    write_orphan(session, key)
    return "written"


@app.post("/streams/{key}")
def stream(key: str, session: SessionDep) -> StreamingResponse:
    write_item(session, key)
    return StreamingResponse(streams.body(key), media_type="text/plain")


@app.post("/releases/{key}")
async def release(key: str) -> str:
    streams.release(key)
    return "released"


@app.get("/misuse")
async def misuse_session(session: SessionDep) -> str:
    misuse(session)  # raises BlockingCallError: this endpoint is `async def`
    return "unreachable"  # pragma: no cover
