"""The benchmark app: one small Starlette app, same routes and same SQL, built six ways.

Seven rows in the tables: context-async-sqlalchemy ships two middlewares, and both
are measured.

Every system serves the same seven routes; only how a handler gets its session, and
who ends its transaction, differs:

========================  ==========================================================
``GET /ping``             never touches the database
``GET /item``             one ``SELECT`` of a seeded row (the read route)
``POST /items``           one ``INSERT`` (the write route), answers 201
``GET /stream``           one ``INSERT``, then a streamed body of ``stream_chunks`` chunks
``POST /orphans``         an ``INSERT`` that breaks a ``DEFERRABLE INITIALLY DEFERRED``
                          foreign key: accepted by the statement, refused at ``COMMIT``
``GET /reads``            three ``SELECT`` s of the seeded row (the latency scenario)
``POST /read-write``      a ``SELECT``, then an ``INSERT`` (the latency scenario)
========================  ==========================================================

The handlers are written once, as functions of an ``AsyncSession``
(``Work``); each system wraps them the way its own documentation shows.  All
systems get the same engine options (pool size, overflow, timeout).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as create_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = [
    "LABELS",
    "PACKAGES",
    "SYSTEMS",
    "AppConfig",
    "build_app",
    "create_schema",
    "package_version",
]

#: The systems, in the order of the table.  ``by_hand`` (no middleware; each handler
#: opens ``async with sessionmaker() as s, s.begin():``) is both the baseline of the
#: database scenarios and the bare app of the no-database one.
SYSTEMS: tuple[str, ...] = (
    "by_hand",
    "asgi_sqla",
    "context_async_sqlalchemy",
    "context_async_sqlalchemy_asgi",
    "fastapi_async_sqlalchemy",
    "advanced_alchemy",
    "asgi_sqlalchemy",
)

LABELS: dict[str, str] = {
    "by_hand": "by hand (no middleware)",
    "asgi_sqla": "asgi_sqla",
    "context_async_sqlalchemy": "context-async-sqlalchemy",
    "context_async_sqlalchemy_asgi": "context-async-sqlalchemy (its pure ASGI middleware)",
    "fastapi_async_sqlalchemy": "fastapi-async-sqlalchemy",
    "advanced_alchemy": "advanced-alchemy (autocommit)",
    "asgi_sqlalchemy": "asgi-sqlalchemy",
}

#: The distribution whose version is reported for each system.
PACKAGES: dict[str, str] = {
    "by_hand": "sqlalchemy",
    "asgi_sqla": "asgi-sqla",
    "context_async_sqlalchemy": "context-async-sqlalchemy",
    "context_async_sqlalchemy_asgi": "context-async-sqlalchemy",
    "fastapi_async_sqlalchemy": "fastapi-async-sqlalchemy",
    "advanced_alchemy": "advanced-alchemy",
    "asgi_sqlalchemy": "asgi-sqlalchemy",
}

# -- schema and SQL: identical for every system ----------------------------------------

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False),
)
parents = Table("parents", metadata, Column("id", Integer, primary_key=True))
children = Table(
    "children",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "parent_id",
        Integer,
        ForeignKey("parents.id", deferrable=True, initially="DEFERRED"),
        nullable=False,
    ),
)

SELECT_ITEM = text("SELECT id, name FROM items WHERE id = :id")
INSERT_ITEM = text("INSERT INTO items (name) VALUES (:name)")
#: No parent has id 0: the deferred foreign key makes the COMMIT fail, not the INSERT.
INSERT_ORPHAN = text("INSERT INTO children (parent_id) VALUES (0)")


async def create_schema(url: str) -> None:
    """Create the tables (dropping old ones) and seed the row ``GET /item`` reads."""
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(metadata.drop_all)
            await connection.run_sync(metadata.create_all)
            await connection.execute(items.insert().values(name="seeded"))  # gets id 1
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class AppConfig:
    """What every system's app is given: the database and the pool, the streamed body."""

    url: str
    pool_size: int = 5
    max_overflow: int = 0
    pool_timeout: int = 30
    stream_chunks: int = 10
    chunk_bytes: int = 512
    #: ``pool_pre_ping`` (the latency scenario's "with pre-ping" rows; off elsewhere).
    pool_pre_ping: bool = False

    @property
    def engine_options(self) -> dict[str, Any]:
        """``create_async_engine`` keyword arguments, the same for every system."""
        options: dict[str, Any] = {
            "pool_size": self.pool_size,
            "max_overflow": self.max_overflow,
            "pool_timeout": self.pool_timeout,
        }
        if self.pool_pre_ping:
            options["pool_pre_ping"] = True
        return options

    @classmethod
    def from_env(cls) -> AppConfig:
        """Read ``BENCH_DATABASE_URL``, ``BENCH_POOL_SIZE``… (the uvicorn target uses it)."""
        return cls(
            url=os.environ["BENCH_DATABASE_URL"],
            pool_size=int(os.environ.get("BENCH_POOL_SIZE", "5")),
            max_overflow=int(os.environ.get("BENCH_MAX_OVERFLOW", "0")),
            stream_chunks=int(os.environ.get("BENCH_STREAM_CHUNKS", "10")),
        )

    def env(self) -> dict[str, str]:
        """The environment :meth:`from_env` reads back in a server process."""
        return {
            "BENCH_DATABASE_URL": self.url,
            "BENCH_POOL_SIZE": str(self.pool_size),
            "BENCH_MAX_OVERFLOW": str(self.max_overflow),
            "BENCH_STREAM_CHUNKS": str(self.stream_chunks),
        }


def package_version(system: str) -> str:
    """The installed version of the distribution behind ``system``."""
    try:
        return version(PACKAGES[system])
    except PackageNotFoundError:
        return "not installed"


# -- the handlers, written once ---------------------------------------------------------

Work = Callable[[AsyncSession], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]
SessionGetter = Callable[[Request], Awaitable[AsyncSession]]


async def ping(request: Request) -> Response:
    """The route that never touches the database."""
    return PlainTextResponse("pong")


async def read_item(session: AsyncSession) -> Response:
    row = (await session.execute(SELECT_ITEM, {"id": 1})).one()
    return JSONResponse({"id": row[0], "name": row[1]})


async def write_item(session: AsyncSession) -> Response:
    await session.execute(INSERT_ITEM, {"name": "written"})
    return JSONResponse({"created": True}, status_code=201)


def stream_after_write(chunks: int, chunk_bytes: int) -> Work:
    """Insert a row, then stream ``chunks`` chunks: the body goes out after the write."""
    chunk = b"x" * (chunk_bytes - 1) + b"\n"

    async def body() -> AsyncIterator[bytes]:
        for _ in range(chunks):
            yield chunk

    async def work(session: AsyncSession) -> Response:
        await session.execute(INSERT_ITEM, {"name": "streamed"})
        return StreamingResponse(body(), media_type="text/plain")

    return work


async def read_three(session: AsyncSession) -> Response:
    """Several reads in one request: the same ``SELECT`` three times."""
    names = [(await session.execute(SELECT_ITEM, {"id": 1})).one()[1] for _ in range(3)]
    return JSONResponse({"names": names})


async def read_then_write(session: AsyncSession) -> Response:
    """A write after a read: the ``SELECT``, then an ``INSERT`` of what it read."""
    row = (await session.execute(SELECT_ITEM, {"id": 1})).one()
    await session.execute(INSERT_ITEM, {"name": row[1]})
    return JSONResponse({"created": True}, status_code=201)


async def write_orphan(session: AsyncSession) -> Response:
    await session.execute(INSERT_ORPHAN)
    return JSONResponse({"created": True}, status_code=201)


def _routes(config: AppConfig, endpoint_for: Callable[[Work], Endpoint]) -> list[Route]:
    return [
        Route("/ping", ping),
        Route("/item", endpoint_for(read_item)),
        Route("/items", endpoint_for(write_item), methods=["POST"]),
        Route(
            "/stream", endpoint_for(stream_after_write(config.stream_chunks, config.chunk_bytes))
        ),
        Route("/orphans", endpoint_for(write_orphan), methods=["POST"]),
        Route("/reads", endpoint_for(read_three)),
        Route("/read-write", endpoint_for(read_then_write), methods=["POST"]),
    ]


def _with_session(get_session: SessionGetter) -> Callable[[Work], Endpoint]:
    """Endpoints that take the session a middleware provides and leave its end to it."""

    def endpoint_for(work: Work) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            return await work(await get_session(request))

        return endpoint

    return endpoint_for


def _disposing(engine: AsyncEngine) -> Callable[[Starlette], Any]:
    """A lifespan that disposes ``engine`` at shutdown (for systems that do not)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    return lifespan


# -- the six systems --------------------------------------------------------------------


def _by_hand(config: AppConfig) -> Starlette:
    """No middleware: each handler opens its own session and transaction."""
    engine = create_engine(config.url, **config.engine_options)
    maker = async_sessionmaker(engine, expire_on_commit=False)

    def endpoint_for(work: Work) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            async with maker() as session, session.begin():
                return await work(session)

        return endpoint

    return Starlette(routes=_routes(config, endpoint_for), lifespan=_disposing(engine))


def _asgi_sqla(config: AppConfig) -> Starlette:
    """This package, as its README shows: ``Middleware(SQLAlchemyMiddleware, db)``."""
    from asgi_sqla import Database, SQLAlchemyMiddleware

    db = Database(config.url, **config.engine_options)

    async def get_session(request: Request) -> AsyncSession:
        return db.session

    return Starlette(
        routes=_routes(config, _with_session(get_session)),
        middleware=[Middleware(SQLAlchemyMiddleware, db)],
    )


def _context_async_sqlalchemy(config: AppConfig, *, pure_asgi: bool = False) -> Starlette:
    """``DBConnect`` + its Starlette middleware + ``db_session()``.

    Its documentation's Starlette set-up is ``add_starlette_http_db_session_middleware``
    (a ``BaseHTTPMiddleware``); with ``pure_asgi`` the package's other middleware,
    ``ASGIHTTPDBSessionMiddleware``, as in its own pure-ASGI example app.
    """
    from context_async_sqlalchemy import ASGIHTTPDBSessionMiddleware, DBConnect, db_session
    from context_async_sqlalchemy.starlette_utils import add_starlette_http_db_session_middleware

    def engine_creator(host: str) -> AsyncEngine:
        return create_engine(config.url, **config.engine_options)

    def session_maker_creator(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
        return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)

    # ``host`` is only handed to engine_creator, which takes the whole URL from config.
    connection = DBConnect(
        engine_creator=engine_creator,
        session_maker_creator=session_maker_creator,
        host="benchmark",
    )

    async def get_session(request: Request) -> AsyncSession:
        return await db_session(connection)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await connection.close()

    app = Starlette(routes=_routes(config, _with_session(get_session)), lifespan=lifespan)
    if pure_asgi:
        app.add_middleware(ASGIHTTPDBSessionMiddleware)
    else:
        add_starlette_http_db_session_middleware(app)
    return app


def _context_async_sqlalchemy_asgi(config: AppConfig) -> Starlette:
    """context-async-sqlalchemy with its pure ASGI middleware."""
    return _context_async_sqlalchemy(config, pure_asgi=True)


def _fastapi_async_sqlalchemy(config: AppConfig) -> Starlette:
    """Its ``SQLAlchemyMiddleware`` with ``commit_on_exit=True``, and ``db.session``.

    Without ``commit_on_exit`` it never commits: the write routes would write nothing.
    A proxy of its own per app (``create_middleware_and_session_proxy``, its way to
    serve several databases), and ``custom_engine`` so that the engine is disposed.
    """
    from fastapi_async_sqlalchemy import create_middleware_and_session_proxy

    middleware_class, db = create_middleware_and_session_proxy()
    engine = create_engine(config.url, **config.engine_options)

    async def get_session(request: Request) -> AsyncSession:
        session: AsyncSession = db.session
        return session

    app = Starlette(routes=_routes(config, _with_session(get_session)), lifespan=_disposing(engine))
    app.add_middleware(middleware_class, custom_engine=engine, commit_on_exit=True)
    return app


def _advanced_alchemy(config: AppConfig) -> Starlette:
    """Its Starlette extension, ``commit_mode="autocommit"``, ``get_async_session()``."""
    from advanced_alchemy.extensions.starlette import (
        AdvancedAlchemy,
        EngineConfig,
        SQLAlchemyAsyncConfig,
    )

    alchemy_config = SQLAlchemyAsyncConfig(
        connection_string=config.url,
        commit_mode="autocommit",
        engine_config=EngineConfig(
            pool_size=config.pool_size,
            max_overflow=config.max_overflow,
            pool_timeout=config.pool_timeout,
        ),
    )
    extension: list[AdvancedAlchemy] = []

    async def get_session(request: Request) -> AsyncSession:
        return extension[0].get_async_session(request)

    app = Starlette(routes=_routes(config, _with_session(get_session)))
    extension.append(AdvancedAlchemy(config=alchemy_config, app=app))
    return app


def _asgi_sqlalchemy(config: AppConfig) -> Starlette:
    """``DatabaseContext`` yielded by the lifespan, ``SessionMiddleware``, ``get_session``."""
    from asgi_sqlalchemy import DatabaseContext, SessionMiddleware
    from asgi_sqlalchemy.starlette import get_session

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with DatabaseContext(config.url, engine_kwargs=config.engine_options) as db:
            yield {"db": db}

    app = Starlette(routes=_routes(config, _with_session(get_session)), lifespan=lifespan)
    app.add_middleware(SessionMiddleware)
    return app


_BUILDERS: dict[str, Callable[[AppConfig], Starlette]] = {
    "by_hand": _by_hand,
    "asgi_sqla": _asgi_sqla,
    "context_async_sqlalchemy": _context_async_sqlalchemy,
    "context_async_sqlalchemy_asgi": _context_async_sqlalchemy_asgi,
    "fastapi_async_sqlalchemy": _fastapi_async_sqlalchemy,
    "advanced_alchemy": _advanced_alchemy,
    "asgi_sqlalchemy": _asgi_sqlalchemy,
}


def build_app(system: str, config: AppConfig) -> Starlette:
    """The benchmark app for ``system`` (one of :data:`SYSTEMS`) on ``config.url``."""
    return _BUILDERS[system](config)
