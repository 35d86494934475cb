"""Round trips of a one-statement transaction, per driver and per way of sending ``BEGIN``.

The figures of ``docs/round-trips.md``: ``python -m benchmarks.round_trips`` starts a
throwaway PostgreSQL (``tests/_postgres.py``, or ``TEST_DATABASE_URL``), puts
``benchmarks/proxy.py`` in front of it (0.5 ms each way), and for each way below runs
one ``SELECT`` and one ``INSERT`` transaction ``--count`` times on a warmed connection,
printing the round trips per transaction (counted at the proxy) and the median time.

The ways (:data:`WAYS`):

* through the package (a ``Database`` and ``SQLAlchemyMiddleware`` in front of a tiny
  ASGI app, called in-process), with the drivers' defaults, with a new statement text
  each request (a statement's first use on a connection), and with the PgBouncer
  settings of the README;
* on the drivers directly, the options the issue asked about: psycopg's pipeline mode
  around the first statement, ``BEGIN`` queued by hand with the first statement (psycopg
  in autocommit mode: the only way that saves a round trip), and asyncpg's
  ``transaction()``, the hand-written floor with asyncpg's API.

``tests/test_begin_round_trips.py`` runs the same ways and checks the counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
from sqlalchemy import URL, make_url, text

from asgi_sqla import Database, SQLAlchemyMiddleware
from benchmarks.inprocess import InProcessServer, Receive, Scope, Send
from benchmarks.proxy import DEFAULT_DELAY, DelayingProxy

__all__ = ["KINDS", "WAYS", "Way", "create_table", "round_trips_of"]

#: The transactions measured: one statement each.
KINDS = ("select", "insert")
#: The table they use (created by :func:`create_table`).
_DDL = "CREATE TABLE IF NOT EXISTS round_trips (id serial PRIMARY KEY, v integer NOT NULL)"
#: The statements, in SQLAlchemy's ``text()`` form and in each driver's paramstyle.
_SQL = {
    "select": ("SELECT v FROM round_trips WHERE id = :v", "$1", "%s"),
    "insert": ("INSERT INTO round_trips (v) VALUES (:v)", "$1", "%s"),
}
#: The connection settings of the README's PgBouncer section (transaction pooling).
_PGBOUNCER_CONNECT_ARGS: dict[str, dict[str, Any]] = {
    "asyncpg": {"statement_cache_size": 0, "prepared_statement_cache_size": 0},
    "psycopg": {"prepare_threshold": None},
}

#: ``run(i)`` runs the ``i``-th transaction (``i`` makes a statement new, for the ways that ask).
Run = Callable[[int], Awaitable[None]]


def _statement(kind: str, style: int, *, new: int | None = None) -> str:
    """The statement of ``kind`` in paramstyle ``style`` (0 SQLAlchemy, 1 asyncpg, 2 psycopg).

    With ``new``, a comment makes its text differ from every other: a statement the
    connection has never seen, so a driver that prepares statements prepares it.
    """
    sql = _SQL[kind][0]
    if style:
        sql = sql.replace(":v", _SQL[kind][style])
    if new is not None:
        sql = sql.replace("round_trips", f"round_trips /* {new} */", 1)
    return sql


@dataclass(frozen=True)
class Way:
    """One way of running a transaction: its name, its driver and how to open it."""

    name: str
    driver: str
    open: Callable[[URL, str], contextlib.AbstractAsyncContextManager[Run]]
    #: What the way is, in a few words (the table's last column).
    what: str


def _package(*, first_use: bool = False, pgbouncer: bool = False) -> Callable[[str], Any]:
    """A way through the package: one request, one statement through ``db.session``."""

    def opener(driver: str) -> Callable[[URL, str], contextlib.AbstractAsyncContextManager[Run]]:
        @contextlib.asynccontextmanager
        async def open_package(url: URL, kind: str) -> AsyncIterator[Run]:
            connect_args = _PGBOUNCER_CONNECT_ARGS[driver] if pgbouncer else {}
            db = Database(
                url.set(drivername=f"postgresql+{driver}"),
                pool_size=1,
                max_overflow=0,
                connect_args=connect_args,
            )

            async def app(scope: Scope, receive: Receive, send: Send) -> None:
                if scope["type"] != "http":
                    return
                i = int(scope["path"][1:])
                sql = _statement(kind, 0, new=i if first_use else None)
                await db.session.execute(text(sql), {"v": 1})
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"ok"})

            async with InProcessServer(SQLAlchemyMiddleware(app, db)) as server:

                async def run(i: int) -> None:
                    outcome = await server.request("GET", f"/{i}")
                    if outcome.status != 200:
                        raise RuntimeError(f"the request failed: {outcome}")

                yield run

        return open_package

    return opener


@contextlib.asynccontextmanager
async def _psycopg_pipeline(url: URL, kind: str) -> AsyncIterator[Run]:
    """psycopg's pipeline mode around the first statement of each transaction."""
    conn = await psycopg.AsyncConnection.connect(url.render_as_string(hide_password=False))
    try:

        async def run(i: int) -> None:
            async with conn.pipeline():
                cursor = await conn.execute(_statement(kind, 2), (1,))
            if kind == "select":
                await cursor.fetchall()
            await conn.commit()

        yield run
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _psycopg_queued_begin(url: URL, kind: str) -> AsyncIterator[Run]:
    """``BEGIN`` queued with the first statement: psycopg in autocommit, the pipeline by hand."""
    conn = await psycopg.AsyncConnection.connect(
        url.render_as_string(hide_password=False), autocommit=True
    )
    try:

        async def run(i: int) -> None:
            async with conn.pipeline():
                await conn.execute("BEGIN")
                cursor = await conn.execute(_statement(kind, 2), (1,))
            if kind == "select":
                await cursor.fetchall()
            await conn.commit()  # psycopg commits what the server says is open

        yield run
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _asyncpg_transaction(url: URL, kind: str) -> AsyncIterator[Run]:
    """asyncpg's own API: ``async with conn.transaction()`` around one statement."""
    conn = await asyncpg.connect(url.render_as_string(hide_password=False))
    try:

        async def run(i: int) -> None:
            async with conn.transaction():
                await conn.fetch(_statement(kind, 1), 1)

        yield run
    finally:
        await conn.close()


WAYS = tuple(
    [
        Way(f"package, {driver}", driver, _package()(driver), "defaults")
        for driver in ("asyncpg", "psycopg")
    ]
    + [
        Way(
            f"package, {driver}, first use",
            driver,
            _package(first_use=True)(driver),
            "a statement new to the connection",
        )
        for driver in ("asyncpg", "psycopg")
    ]
    + [
        Way(
            f"package, {driver}, PgBouncer settings",
            driver,
            _package(pgbouncer=True)(driver),
            "the README's PgBouncer connect_args",
        )
        for driver in ("asyncpg", "psycopg")
    ]
    + [
        Way(
            "psycopg, pipeline mode",
            "psycopg",
            _psycopg_pipeline,
            "`conn.pipeline()` around the first statement",
        ),
        Way(
            "psycopg, BEGIN queued by hand",
            "psycopg",
            _psycopg_queued_begin,
            "autocommit connection, BEGIN + statement in one pipeline",
        ),
        Way(
            "asyncpg, transaction()",
            "asyncpg",
            _asyncpg_transaction,
            "asyncpg's API, by hand",
        ),
    ]
)


async def create_table(url: URL) -> None:
    """Create the table the transactions use, with the row the ``SELECT`` reads."""
    async with await psycopg.AsyncConnection.connect(
        url.render_as_string(hide_password=False), autocommit=True
    ) as conn:
        await conn.execute(_DDL)
        await conn.execute(
            "INSERT INTO round_trips (v) SELECT 1 WHERE NOT EXISTS (SELECT FROM round_trips)"
        )


async def round_trips_of(
    way: Way, proxy: DelayingProxy, server: URL, kind: str, count: int, *, warm_up: int = 8
) -> tuple[list[int], list[float]]:
    """Each transaction's round trips (at ``proxy``) and seconds, after ``warm_up`` ones.

    ``server`` is the database's URL without a driver; the way connects through the
    proxy.  The warm-up opens the connection and runs the statement past psycopg's
    ``prepare_threshold`` (5), so the figures are those of a connection in use.
    """
    url = server.set(host=proxy.host, port=proxy.port)
    counts: list[int] = []
    seconds: list[float] = []
    async with way.open(url, kind) as run:
        for i in range(warm_up):
            await run(-1 - i)
        for i in range(count):
            proxy.reset()
            started = time.perf_counter()
            await run(i)
            seconds.append(time.perf_counter() - started)
            counts.append(proxy.round_trips)
    return counts, seconds


def _server() -> tuple[URL, contextlib.AbstractContextManager[None]]:
    """The PostgreSQL to measure on: ``TEST_DATABASE_URL``, or a throwaway cluster."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import _postgres  # tests/: the throwaway PostgreSQL the tests use

    if value := os.environ.get("TEST_DATABASE_URL"):
        return _postgres.server_url_from_env(value), contextlib.nullcontext()
    bindir = _postgres.find_bindir()
    if bindir is None:
        raise SystemExit("No PostgreSQL server binaries found; set TEST_DATABASE_URL.")
    cluster = _postgres.TemporaryCluster(bindir)
    url = cluster.start()

    @contextlib.contextmanager
    def stopping() -> Any:
        try:
            yield
        finally:
            cluster.stop()

    return url, stopping()


async def _measure(server: URL, delay: float, count: int) -> None:
    await create_table(server)
    print(f"Round trips per transaction and median time, {delay * 1e3:g} ms added each way")
    print()
    print("| way | driver | statement | round trips | median ms | what |")
    print("|---|---|---|---:|---:|---|")
    assert server.host is not None
    assert server.port is not None
    with DelayingProxy(server.host, server.port, delay=delay) as proxy:
        for way in WAYS:
            for kind in KINDS:
                counts, seconds = await round_trips_of(way, proxy, server, kind, count)
                print(
                    f"| {way.name} | {way.driver} | {kind.upper()} | "
                    f"{statistics.fmean(counts):.2f} | {statistics.median(seconds) * 1e3:.2f} | "
                    f"{way.what} |"
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--delay", type=float, default=DEFAULT_DELAY, help="seconds, each way")
    parser.add_argument("--count", type=int, default=200, help="transactions per way and kind")
    args = parser.parse_args(argv)
    server, stopping = _server()
    with stopping:
        asyncio.run(_measure(make_url(server), args.delay, args.count))


if __name__ == "__main__":
    main()
