"""Quart over a ``SyncDatabase`` (the routes of ``sync_common``), its two ways to run sync code.

A ``def`` view: Quart runs it in the event loop's default executor
(``app.ensure_async``, which is ``quart.utils.run_sync``).  An ``async def`` view hands
its synchronous work to ``run_sync`` or ``app.ensure_async`` itself.  Both copy the
context, so ``db.session`` is the request's ``Session`` in the worker thread; reading
it on the event loop (to pass it on) is allowed, using it there is not.  A synchronous
body is iterated in the executor too.  ``init_app`` is called as the adapter asks.
"""

from __future__ import annotations

from typing import Any

from quart import Quart, Response, abort
from quart.utils import run_sync

from asgi_sqla import SQLAlchemyMiddleware
from asgi_sqla.quart import init_app

from .sync_common import app_parts, health_report, misuse, write_item, write_orphan

db, counter, streams = app_parts()

app = Quart(__name__)
app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)  # type: ignore[method-assign]
init_app(app)


@app.get("/health")
async def health() -> dict[str, object]:
    return health_report(db)


@app.get("/pool")
async def pool() -> dict[str, int]:
    return counter.report()


@app.post("/items/<key>/<int:status>")
def create_item(key: str, status: int) -> tuple[str, int]:
    write_item(db.session, key)
    if status >= 400:
        abort(status)
    return key, status


@app.post("/orphans/<key>")
async def create_orphan(key: str) -> tuple[str, int]:
    await run_sync(write_orphan)(db.session, key)
    return "written", 201


@app.post("/streams/<key>")
async def stream(key: str) -> Response:
    await app.ensure_async(write_item)(db.session, key)
    return Response(streams.body(key), mimetype="text/plain")


@app.post("/releases/<key>")
async def release(key: str) -> str:
    streams.release(key)
    return "released"


@app.get("/misuse")
async def misuse_session() -> Any:
    misuse(db.session)  # raises BlockingCallError: this view is `async def`
    return "unreachable"  # pragma: no cover
