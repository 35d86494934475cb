"""BlackSheep with the routes of ``probe_common``; the session comes through its DI.

A handler parameter annotated ``AsyncSession`` is resolved by BlackSheep's container
(rodi) with ``db.session``, in the request's context.  A status of 400 or more is
raised as ``HTTPException``; an unhandled exception becomes BlackSheep's own 500.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from blacksheep import Application, Response, json, text
from blacksheep.contents import StreamedContent
from blacksheep.exceptions import HTTPException
from rodi import Container
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_sqla import SQLAlchemyMiddleware

from .probe_common import RaisedOnPurpose, async_probe, identity, read, write_item, write_orphan

db, checkouts, gates = async_probe()


def request_session() -> AsyncSession:
    return db.session


services = Container()
services.add_transient_by_factory(request_session, AsyncSession)
blacksheep_app = Application(services=services)
get, post = blacksheep_app.router.get, blacksheep_app.router.post


@get("/health")
async def health() -> Response:
    return json({"connections_in_use": db.pool_status().checked_out})


@get("/pool")
async def pool() -> Response:
    return json(checkouts.report())


@post("/items/{key}/{status}")
async def create_item(key: str, status: int) -> Response:
    await write_item(db, key)
    if status >= 400:
        raise HTTPException(status)
    return text(key, status=status)


@post("/orphans/{key}")
async def create_orphan(key: str) -> Response:
    await write_orphan(db, key)
    return text("written", status=201)


@post("/raises/{key}")
async def raise_after_writing(key: str) -> Response:
    await write_item(db, key)
    raise RaisedOnPurpose(key)


@post("/streams/{key}")
async def stream(key: str) -> Response:
    await write_item(db, key)

    async def body() -> AsyncIterator[bytes]:  # StreamedContent takes an async generator function
        async for chunk in gates.body(key):
            yield chunk

    return Response(200, content=StreamedContent(b"text/plain", body))


@post("/waits/{key}")
async def wait(key: str) -> Response:
    await write_item(db, key)
    if not await gates.wait(key):
        return text("late", status=504)
    await write_item(db, f"{key}-late")
    return text("released", status=201)


@post("/releases/{key}")
async def release(key: str) -> Response:
    gates.release(key)
    return text("released")


@post("/meets/{pair}")
async def meet(pair: str, session: AsyncSession) -> Response:
    await read(db)
    assert session is db.session  # DI resolved the request's own session
    return json(identity(session, await gates.meet(pair)), status=201)


app = SQLAlchemyMiddleware(blacksheep_app, db)
