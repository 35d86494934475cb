"""Falcon's ASGI app with the routes of ``probe_common``: ``async def`` responders.

Falcon refuses a synchronous responder on ``falcon.asgi.App`` (``add_route`` raises
``TypeError``), so every responder here is a coroutine.  A status of 400 or more is
raised as ``falcon.HTTPError``; an unhandled exception becomes Falcon's own 500.

Also ``POST /schedules/{key}?scoped=yes|no``: a write scheduled with
``resp.schedule``, which Falcon runs as a task of its own once the response is sent
and the request is over, in ``async with db.scope():`` or on ``db.session`` alone; and
``GET /scheduled/{key}``, what became of it.
"""

from __future__ import annotations

import logging

import falcon
import falcon.asgi
from falcon.asgi import Request, Response

from asgi_sqla import SQLAlchemyMiddleware

from .probe_common import RaisedOnPurpose, async_probe, identity, read, write_item, write_orphan

db, checkouts, gates = async_probe()

# Falcon logs an unhandled exception to the "falcon" logger; Falcon 4.0 gives that
# logger a NullHandler (4.4 no longer does), which hides the traceback unless the app
# configures it.
logging.getLogger("falcon").addHandler(logging.StreamHandler())


class Health:
    async def on_get(self, req: Request, resp: Response) -> None:
        resp.media = {"connections_in_use": db.pool_status().checked_out}


class Pool:
    async def on_get(self, req: Request, resp: Response) -> None:
        resp.media = checkouts.report()


class Items:
    async def on_post(self, req: Request, resp: Response, key: str, status: int) -> None:
        await write_item(db, key)
        if status >= 400:
            raise falcon.HTTPError(falcon.code_to_http_status(status))
        resp.status, resp.text = status, key


class Orphans:
    async def on_post(self, req: Request, resp: Response, key: str) -> None:
        await write_orphan(db, key)
        resp.status, resp.text = 201, "written"


class Raises:
    async def on_post(self, req: Request, resp: Response, key: str) -> None:
        await write_item(db, key)
        raise RaisedOnPurpose(key)


class Streams:
    async def on_post(self, req: Request, resp: Response, key: str) -> None:
        await write_item(db, key)
        resp.content_type = "text/plain"
        resp.stream = gates.body(key)


class Waits:
    async def on_post(self, req: Request, resp: Response, key: str) -> None:
        await write_item(db, key)
        if not await gates.wait(key):
            resp.status, resp.text = 504, "timed out"
            return
        await write_item(db, f"{key}-late")
        resp.status, resp.text = 201, "released"


class Releases:
    async def on_post(self, req: Request, resp: Response, key: str) -> None:
        gates.release(key)
        resp.text = "released"


#: What became of each scheduled write: "written", or the exception it raised.
scheduled: dict[str, str] = {}


class Schedules:
    async def on_post(self, req: Request, resp: Response, key: str) -> None:
        scoped = req.get_param_as_bool("scoped", required=True)

        async def write_later() -> None:
            try:
                if scoped:
                    async with db.scope():
                        await write_item(db, key)
                else:
                    await write_item(db, key)
            except Exception as exc:
                scheduled[key] = f"{type(exc).__name__}: {exc}"
                raise
            scheduled[key] = "written"

        resp.schedule(write_later)
        resp.status, resp.text = 202, "scheduled"


class Scheduled:
    async def on_get(self, req: Request, resp: Response, key: str) -> None:
        resp.media = {"outcome": scheduled.get(key)}


class Meets:
    async def on_post(self, req: Request, resp: Response, pair: str) -> None:
        await read(db)
        session = db.session
        resp.status, resp.media = 201, identity(session, await gates.meet(pair))


falcon_app = falcon.asgi.App()
falcon_app.add_route("/health", Health())
falcon_app.add_route("/pool", Pool())
falcon_app.add_route("/items/{key}/{status:int}", Items())
falcon_app.add_route("/orphans/{key}", Orphans())
falcon_app.add_route("/raises/{key}", Raises())
falcon_app.add_route("/streams/{key}", Streams())
falcon_app.add_route("/waits/{key}", Waits())
falcon_app.add_route("/releases/{key}", Releases())
falcon_app.add_route("/meets/{pair}", Meets())
falcon_app.add_route("/schedules/{key}", Schedules())
falcon_app.add_route("/scheduled/{key}", Scheduled())

app = SQLAlchemyMiddleware(falcon_app, db)
