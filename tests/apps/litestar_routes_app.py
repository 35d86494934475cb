"""A Litestar app with a read-only route, served by uvicorn in ``tests/test_route_paths.py``.

``GET /reports/{id}?key=...`` and ``GET /orders/{id}?key=...`` both try to insert
``key`` and answer whether the write went through, with the path as the server
received it.  The middleware makes ``/reports/*`` read-only; Litestar routes
``//reports/1``, ``/reports/1/`` and ``///reports//1`` to the same handler, so every
spelling must be refused.  The database comes from ``DATABASE_URL`` (PostgreSQL, which
refuses a write in a ``READ ONLY`` transaction at once).
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, get
from litestar.logging import LoggingConfig
from sqlalchemy import Column, Integer, MetaData, String, Table
from sqlalchemy.exc import DBAPIError

from asgi_sqla import Database, SQLAlchemyMiddleware

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(64), nullable=False, unique=True),
)

db = Database()  # DATABASE_URL


async def create_tables() -> None:
    async with db.engine.begin() as connection:  # started by the middleware already
        await connection.run_sync(metadata.create_all)


async def write(request: Request[Any, Any, Any], key: str) -> dict[str, Any]:
    """Insert ``key``; say whether the transaction took it, and which path was asked for."""
    raw_path = request.scope["raw_path"].decode()
    try:
        await db.session.execute(items.insert().values(key=key))
    except DBAPIError:  # PostgreSQL: "cannot execute INSERT in a read-only transaction"
        await db.rollback()
        return {"raw_path": raw_path, "written": False}
    return {"raw_path": raw_path, "written": True}


@get("/reports/{report_id:int}")
async def view_report(request: Request[Any, Any, Any], report_id: int, key: str) -> dict[str, Any]:
    return await write(request, key)


@get("/orders/{order_id:int}")
async def view_order(request: Request[Any, Any, Any], order_id: int, key: str) -> dict[str, Any]:
    return await write(request, key)


app = SQLAlchemyMiddleware(
    Litestar(
        route_handlers=[view_report, view_order],
        on_startup=[create_tables],
        logging_config=LoggingConfig(configure_root_logger=False),
    ),
    db,
    read_only=["/reports/*"],
)
