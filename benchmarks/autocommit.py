"""One ``SELECT`` per request, the database 0.5 ms away: autocommit reads against the rest.

``python benchmarks/autocommit.py [--requests N] [--delay SECONDS]`` starts a throwaway
PostgreSQL (``tests/_postgres.py``, or the server of ``TEST_DATABASE_URL``), puts the
delaying proxy (``benchmarks/proxy.py``) in front of it and calls each app in this
process, interleaved, ``N`` times, on a pool of one connection warmed beforehand:

* ``no database``: the middleware and an app that does not use the session;
* ``hand-written``: no middleware, ``async with session.begin()`` around the query
  (what the issue calls hand-written code: ``BEGIN``, the ``SELECT``, ``COMMIT``);
* ``asgi_sqla``: the middleware, a route that commits at the response start;
* ``read_only``: a ``read_only=`` route (``BEGIN``, ``SET TRANSACTION READ ONLY``,
  the ``SELECT``, ``ROLLBACK``);
* ``autocommit_reads``: an ``autocommit_reads=`` route (the ``SELECT`` alone);
* ``by hand, autocommit`` and ``Core, autocommit``: no middleware, an ``AsyncSession``
  or a ``Connection`` of the engine's ``execution_options(isolation_level="AUTOCOMMIT")``:
  what SQLAlchemy itself costs on the same single round trip;
* ``driver``: the driver's own connection, the query alone, no SQLAlchemy: the
  physical cost of one round trip, the yardstick.

It prints, per driver, each app's median and p90 latency, its round trips per request
(counted by the proxy), and its time on the database: its median minus that of ``no
database``, also as a multiple of ``driver``'s median.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Column, Integer, MetaData, String, Table, make_url, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from asgi_sqla import Database, SQLAlchemyMiddleware  # noqa: E402
from benchmarks.proxy import DelayingProxy  # noqa: E402

import _postgres  # noqa: E402  (tests/: the throwaway PostgreSQL the tests use)

metadata = MetaData()
rows = Table(
    "bench_rows",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(32), nullable=False),
)
QUERY = select(rows.c.name).where(rows.c.id == 1)
DRIVERS = ("postgresql+asyncpg", "postgresql+psycopg")

Message = dict[str, Any]
App = Callable[
    [dict[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


async def respond(send: Callable[[Message], Awaitable[None]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def call(app: App, path: str) -> None:
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
    }
    status: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [200]:
        raise RuntimeError(f"{path} answered {status}")


def apps(url: str) -> tuple[dict[str, tuple[App, str]], Callable[[], Awaitable[None]]]:
    """The apps measured, by name: (app, path); and what closes their engines."""
    db = Database(url, pool_size=1, max_overflow=0)

    async def with_db(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/none":
            await respond(send, b"-")
            return
        name = (await db.session.execute(QUERY)).scalar_one()
        await respond(send, name.encode())

    middleware: App = SQLAlchemyMiddleware(
        with_db, db, read_only=["/read_only"], autocommit_reads=["/autocommit"]
    )
    engine = create_async_engine(url, pool_size=1, max_overflow=0)

    async def hand_written(scope: Any, receive: Any, send: Any) -> None:
        async with AsyncSession(engine) as session, session.begin():
            name = (await session.execute(QUERY)).scalar_one()
        await respond(send, name.encode())

    autocommit_engine = engine.execution_options(isolation_level="AUTOCOMMIT")

    async def hand_written_autocommit(scope: Any, receive: Any, send: Any) -> None:
        async with AsyncSession(autocommit_engine) as session:
            name = (await session.execute(QUERY)).scalar_one()
        await respond(send, name.encode())

    async def core_autocommit(scope: Any, receive: Any, send: Any) -> None:
        async with autocommit_engine.connect() as connection:
            name = (await connection.execute(QUERY)).scalar_one()
        await respond(send, name.encode())

    driver_connection: list[Any] = []

    async def driver(scope: Any, receive: Any, send: Any) -> None:
        if not driver_connection:
            driver_connection.append(await connect_driver(url))
        await respond(send, (await fetch_name(driver_connection[0])).encode())

    async def close() -> None:
        await db.dispose()
        await engine.dispose()
        for connection in driver_connection:
            await connection.close()

    return {
        "no database": (middleware, "/none"),
        "hand-written": (hand_written, "/"),
        "asgi_sqla": (middleware, "/"),
        "read_only": (middleware, "/read_only"),
        "autocommit_reads": (middleware, "/autocommit"),
        "by hand, autocommit": (hand_written_autocommit, "/"),
        "Core, autocommit": (core_autocommit, "/"),
        "driver": (driver, "/"),
    }, close


async def connect_driver(url: str) -> Any:
    parsed = make_url(url)
    if parsed.drivername.endswith("asyncpg"):
        import asyncpg

        return await asyncpg.connect(
            host=parsed.host, port=parsed.port, user=parsed.username, database=parsed.database
        )
    import psycopg

    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True)


async def fetch_name(connection: Any) -> str:
    if hasattr(connection, "fetchval"):  # asyncpg
        return str(await connection.fetchval("SELECT name FROM bench_rows WHERE id = $1", 1))
    cursor = await connection.execute("SELECT name FROM bench_rows WHERE id = %s", (1,))
    row = await cursor.fetchone()
    return str(row[0])


async def measure(url: str, proxy: DelayingProxy, requests: int) -> dict[str, dict[str, float]]:
    measured, close = apps(url)
    latencies: dict[str, list[float]] = {name: [] for name in measured}
    trips: dict[str, list[int]] = {name: [] for name in measured}
    try:
        for app, path in measured.values():  # warm: connect, prepare, cache
            for _ in range(5):
                await call(app, path)
        for _ in range(requests):
            for name, (app, path) in measured.items():
                proxy.reset()
                started = time.perf_counter()
                await call(app, path)
                latencies[name].append(time.perf_counter() - started)
                trips[name].append(proxy.round_trips)
    finally:
        await close()
    return {
        name: {
            "median": statistics.median(values),
            "p90": sorted(values)[int(len(values) * 0.9)],
            "round_trips": statistics.mean(trips[name]),
        }
        for name, values in latencies.items()
    }


@contextlib.contextmanager
def postgresql() -> Iterator[URL]:
    """The driver-less URL of a fresh database with ``bench_rows``; dropped on exit."""
    with contextlib.ExitStack() as cleanup:
        external = os.environ.get("TEST_DATABASE_URL")
        if external:
            server = _postgres.server_url_from_env(external)
        else:
            bindir = _postgres.find_bindir()
            if bindir is None:
                raise SystemExit("no PostgreSQL server binaries, and no TEST_DATABASE_URL")
            cluster = _postgres.TemporaryCluster(bindir)
            cleanup.callback(cluster.stop)
            server = cluster.start()
        factory = _postgres.DatabaseFactory(server)
        cleanup.callback(factory.close)
        database = factory.create()
        cleanup.callback(factory.drop, database)
        with _postgres.connect(database) as connection:
            connection.execute("CREATE TABLE bench_rows (id INTEGER PRIMARY KEY, name VARCHAR(32))")
            connection.execute("INSERT INTO bench_rows VALUES (1, 'one')")
        yield database


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=300, help="per app and driver")
    parser.add_argument("--delay", type=float, default=0.0005, help="seconds, each way")
    args = parser.parse_args(argv)
    with postgresql() as database:
        assert database.host is not None
        assert database.port is not None
        with DelayingProxy(database.host, database.port, delay=args.delay) as proxy:
            for drivername in DRIVERS:
                url = database.set(drivername=drivername, host=proxy.host, port=proxy.port)
                results = asyncio.run(
                    measure(url.render_as_string(hide_password=False), proxy, args.requests)
                )
                print_table(drivername, results, args)


def print_table(drivername: str, results: dict[str, dict[str, float]], args: Any) -> None:
    bare = results["no database"]["median"]
    physical = results["driver"]["median"]
    print(f"\n{drivername}, {args.delay * 1e3:g} ms each way, {args.requests} requests per app")
    print(
        f"{'app':<22}{'median ms':>10}{'p90 ms':>9}{'round trips':>13}{'db ms':>8}{'x driver':>10}"
    )
    for name, figures in results.items():
        on_db = figures["median"] - bare if name != "driver" else physical
        print(
            f"{name:<22}{figures['median'] * 1e3:>10.2f}{figures['p90'] * 1e3:>9.2f}"
            f"{figures['round_trips']:>13.2f}{on_db * 1e3:>8.2f}{on_db / physical:>10.2f}"
        )


if __name__ == "__main__":
    main()
