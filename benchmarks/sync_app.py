"""The sync scenario's app: FastAPI ``def`` endpoints on a synchronous driver, built two ways.

FastAPI's SQL tutorial is the hand-written reference: a ``yield`` dependency opens
``Session(engine)`` for each request, endpoints are plain ``def`` functions (FastAPI
runs them in anyio's worker threads), and an endpoint that writes calls
``session.commit()`` itself.  With asgi_sqla the endpoints are the same, the
dependency is ``session_dependency(SyncDatabase(...))`` and nothing commits: the
middleware does, before the status line is sent.

========================  ==========================================================
``GET /ping``             ``async def``, never touches the database (readiness)
``GET /item``             one ``SELECT`` by primary key (the read route)
``POST /items``           one ``INSERT`` (the write route), answers 201
``GET /stream``           the tutorial's create: ``INSERT … RETURNING id``, then the row
                          read back (its ``session.refresh(hero)``), then a streamed body
``GET /_counters``        ``async def``: the counters of :func:`install_thread_counters`
========================  ==========================================================

Systems:

* ``by_hand``: the tutorial, ``SessionDep = Annotated[Session, Depends(get_session)]``.
  Since FastAPI 0.118 the code after ``yield`` (closing the session) runs once the
  response has been sent, streamed body included.
* ``by_hand_function_scope``: the same with ``Depends(get_session, scope="function")``
  (FastAPI 0.121+), which closes the session when the endpoint returns, before the
  response is sent: FastAPI's own way to give the connection back early.
* ``asgi_sqla``: ``SyncDatabase`` and ``SQLAlchemyMiddleware``.

This module does not use ``from __future__ import annotations``: FastAPI reads the
endpoints' annotations at run time, and ``SessionDep`` is local to each builder.
"""

import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.orm import Session

from benchmarks.app import AppConfig

__all__ = [
    "SYNC_LABELS",
    "SYNC_SYSTEMS",
    "build_sync_app",
    "counted",
    "install_thread_counters",
    "sync_url",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The systems, in the order of the tables; ``by_hand`` is the reference.
SYNC_SYSTEMS: tuple[str, ...] = ("by_hand", "by_hand_function_scope", "asgi_sqla")

SYNC_LABELS: dict[str, str] = {
    "by_hand": "by hand: FastAPI tutorial, `Depends(get_session)`",
    "by_hand_function_scope": 'by hand: `Depends(get_session, scope="function")`',
    "asgi_sqla": "asgi_sqla: `SyncDatabase`, `session_dependency(db)`",
}

SELECT_ITEM = text("SELECT id, name FROM items WHERE id = :id")
INSERT_ITEM = text("INSERT INTO items (name) VALUES (:name)")
INSERT_ITEM_RETURNING = text("INSERT INTO items (name) VALUES (:name) RETURNING id")


def sync_url(url: str) -> str:
    """``url`` with psycopg 3 as its driver, used synchronously (``postgresql+psycopg``)."""
    return make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


# -- the endpoints, written once -----------------------------------------------------


async def _chunks(count: int, size: int) -> AsyncIterator[bytes]:
    """The streamed body: an async generator, as in the async scenario, so that sending
    it takes no worker thread (a sync generator would take one per chunk, in both apps)."""
    chunk = b"x" * (size - 1) + b"\n"
    for _ in range(count):
        yield chunk


def _add_routes(app: FastAPI, session_dep: Any, config: AppConfig, *, commits: bool) -> None:
    """The same ``def`` endpoints on ``app``; ``commits``: the endpoint commits its writes.

    ``session_dep`` is the app's ``SessionDep`` (``Annotated[Session, Depends(...)]``).
    Endpoints return ``Response`` objects, as the async scenario's do: FastAPI then
    validates no return value (which, for a ``def`` endpoint, it would do in a worker
    thread, one more hop for both systems).
    """

    @app.get("/ping")
    async def ping() -> Response:
        return PlainTextResponse("pong")

    @app.get("/item")
    def read_item(session: session_dep) -> Response:
        row = session.execute(SELECT_ITEM, {"id": 1}).one()
        return JSONResponse({"id": row[0], "name": row[1]})

    @app.post("/items")
    def create_item(session: session_dep) -> Response:
        session.execute(INSERT_ITEM, {"name": "written"})
        if commits:
            session.commit()
        return JSONResponse({"created": True}, status_code=201)

    @app.get("/stream")
    def create_and_stream(session: session_dep) -> Response:
        # The tutorial's create: add, commit, refresh.  The refresh is a SELECT that
        # opens a new transaction, which stays open until the session is closed.
        new_id = session.execute(INSERT_ITEM_RETURNING, {"name": "streamed"}).scalar_one()
        if commits:
            session.commit()
        session.execute(SELECT_ITEM, {"id": new_id}).one()
        body = _chunks(config.stream_chunks, config.chunk_bytes)
        return StreamingResponse(body, media_type="text/plain")

    @app.get("/_counters")
    async def counters() -> Response:
        return JSONResponse(_counters.snapshot())


# -- the systems ---------------------------------------------------------------------


def _by_hand(config: AppConfig, *, scope: str = "request") -> FastAPI:
    """FastAPI's SQL tutorial: a ``yield`` dependency around ``Session(engine)``."""
    engine = create_engine(sync_url(config.url), **config.engine_options)

    def get_session() -> Iterator[Session]:
        with Session(engine) as session:
            yield session

    dependency = (
        Depends(get_session, scope="function") if scope == "function" else Depends(get_session)
    )
    SessionDep = Annotated[Session, dependency]

    app = FastAPI(lifespan=_disposing(engine))
    _add_routes(app, SessionDep, config, commits=True)
    return app


def _by_hand_function_scope(config: AppConfig) -> FastAPI:
    return _by_hand(config, scope="function")


def _asgi_sqla(config: AppConfig) -> FastAPI:
    """The same endpoints; the session from ``session_dependency(db)``, ended by the middleware."""
    from asgi_sqla import SQLAlchemyMiddleware, SyncDatabase
    from asgi_sqla.fastapi import session_dependency

    db = SyncDatabase(sync_url(config.url), **config.engine_options)
    SessionDep = Annotated[Session, Depends(session_dependency(db))]

    app = FastAPI()
    _add_routes(app, SessionDep, config, commits=False)
    app.add_middleware(SQLAlchemyMiddleware, db)
    return app


def _disposing(engine: Engine) -> Callable[[FastAPI], Any]:
    """A lifespan that disposes ``engine`` at shutdown, in a worker thread."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await anyio.to_thread.run_sync(engine.dispose)

    return lifespan


_BUILDERS: dict[str, Callable[[AppConfig], FastAPI]] = {
    "by_hand": _by_hand,
    "by_hand_function_scope": _by_hand_function_scope,
    "asgi_sqla": _asgi_sqla,
}


def build_sync_app(system: str, config: AppConfig) -> FastAPI:
    """The sync benchmark app for ``system`` (one of :data:`SYNC_SYSTEMS`)."""
    return _BUILDERS[system](config)


# -- counting thread hops and requests ---------------------------------------------------


class _Counters:
    """Requests served and worker-thread hops taken, for the whole process.

    A hop is one call of a worker-thread entry point: anyio's ``to_thread.run_sync``
    for the framework (what Starlette's ``run_in_threadpool`` and FastAPI's ``def``
    dependencies and endpoints go through, with anyio's default limiter) or asgi_sqla's
    ``_threaded.in_worker`` (anyio's threads under a limiter of its own, where it ends
    a sync session).  Counts are read before and after a run and divided by
    the requests served meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = 0
        self.finished = 0
        self.framework_hops = 0
        self.package_hops = 0

    def add(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "requests": self.finished,
                "in_flight": self.started - self.finished,
                "framework_hops": self.framework_hops,
                "package_hops": self.package_hops,
            }


_counters = _Counters()


def install_thread_counters() -> None:
    """Count every call of anyio's ``to_thread.run_sync`` and asgi_sqla's ``in_worker``.

    Both are looked up as module attributes when called (``anyio.to_thread.run_sync``
    by Starlette, FastAPI and ``in_worker``; ``in_worker`` by
    ``_threaded.end_thread_session``), so replacing the attribute counts every call.
    ``in_worker`` passes the package's ``limiter`` to ``run_sync``: those calls count
    as the package's, not the framework's.  For the uvicorn process only: the in-process
    scenarios do not count.
    """
    from asgi_sqla import _threaded

    run_sync = anyio.to_thread.run_sync
    in_worker = _threaded.in_worker

    async def counted_run_sync(*args: Any, **kwargs: Any) -> Any:
        # FastAPI exits `yield` dependencies under a limiter of its own: only the
        # package's limiter tells the package's calls apart.
        limiter = kwargs.get("limiter")
        if limiter is None or limiter is not _threaded._limiter.get(None):
            _counters.add("framework_hops")
        return await run_sync(*args, **kwargs)

    async def counted_in_worker(*args: Any) -> Any:
        _counters.add("package_hops")
        return await in_worker(*args)

    anyio.to_thread.run_sync = counted_run_sync  # type: ignore[assignment]
    _threaded.in_worker = counted_in_worker  # type: ignore[assignment]


def counted(app: ASGIApp) -> ASGIApp:
    """``app`` inside a middleware that counts the HTTP requests it finishes.

    ``/_counters`` and ``/ping`` are not counted; a request counts as finished once
    the app has returned (for asgi_sqla, after its ending).
    """

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ("/_counters", "/ping"):
            await app(scope, receive, send)
            return
        _counters.add("started")
        try:
            await app(scope, receive, send)
        finally:
            _counters.add("finished")

    return middleware


def from_env() -> ASGIApp:
    """The uvicorn target's app: ``BENCH_SYSTEM`` built on :meth:`AppConfig.from_env`."""
    install_thread_counters()
    return counted(build_sync_app(os.environ["BENCH_SYSTEM"], AppConfig.from_env()))
