"""``RequestStats.round_trips`` against the round trips a proxy counts on the wire.

Each request kind runs through ``benchmarks/proxy.py`` (no delay) on asyncpg and
psycopg: what SQLAlchemy's events let the package count must be what the server was
sent, and where it cannot be (asyncpg prepares a statement on its first use on a
connection, inside one execution), the tests show the difference and its size.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from sqlalchemy import URL, make_url, select, text

from asgi_sqla import Database, RequestStats, SQLAlchemyMiddleware
from asgi_sqla.types import Receive, Scope, Send
from benchmarks.proxy import DelayingProxy

from _helpers import add_key, call_http, items, open_database, plain_response

pytestmark = [pytest.mark.anyio, pytest.mark.postgresql]

Work = Callable[[Database], Awaitable[None]]


async def one_read(db: Database) -> None:
    await db.session.execute(select(items.c.key).where(items.c.id == 1))


async def three_reads(db: Database) -> None:
    for _ in range(3):
        await one_read(db)


async def one_write(db: Database) -> None:
    await add_key(db, uuid.uuid4().hex)


async def write_after_read(db: Database) -> None:
    await one_read(db)
    await one_write(db)


async def nothing(db: Database) -> None:
    pass


async def connection_only(db: Database) -> None:
    """SQLAlchemy begins a transaction, the driver is sent nothing: no BEGIN, no COMMIT."""
    await db.session.connection()


#: kind -> (work, status answered, round trips: BEGIN + statements + COMMIT/ROLLBACK).
KINDS: dict[str, tuple[Work, int, int]] = {
    "one read": (one_read, 200, 3),
    "three reads": (three_reads, 200, 5),
    "one write": (one_write, 201, 3),
    "write after read": (write_after_read, 201, 4),
    "a read answered 500 (rolled back)": (one_read, 500, 3),
    "no database use": (nothing, 200, 0),
    "a connection taken, no statement": (connection_only, 200, 0),
}
#: What a pool pre-ping costs: SQLAlchemy's asyncpg adapter wraps its empty statement in
#: BEGIN and ROLLBACK; psycopg's dialect pings with a SELECT 1 in autocommit.
PING = {"asyncpg": 3, "psycopg": 1}


@pytest.fixture
def proxy(postgres_database: URL) -> Iterator[DelayingProxy]:
    assert postgres_database.host is not None
    assert postgres_database.port is not None
    with DelayingProxy(postgres_database.host, postgres_database.port, delay=0.0) as proxy:
        yield proxy


def asyncpg_url(database: URL) -> str:
    return database.set(drivername="postgresql+asyncpg").render_as_string(False)


def through(url: str, proxy: DelayingProxy) -> str:
    return make_url(url).set(host=proxy.host, port=proxy.port).render_as_string(False)


@pytest.fixture
async def tables(postgres_database: URL) -> AsyncIterator[None]:
    setup = await open_database(asyncpg_url(postgres_database))
    try:
        async with setup.scope():
            await add_key(setup, "seeded")
        yield
    finally:
        await setup.dispose()


async def request_stats(db: Database, work: Work, status: int) -> RequestStats:
    """Run ``work`` in one request through the middleware; its statistics once it ended."""
    seen: list[RequestStats] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await work(db)
        assert db.stats is not None
        seen.append(db.stats)  # the same object: the COMMIT is counted into it later
        await plain_response(send, status)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))
    assert recorder.status == status
    [stats] = seen
    return stats


def driver_of(url: str) -> str:
    return make_url(url).get_driver_name()


#: psycopg's own preparation of a statement run often, and the DEALLOCATE ALL it sends
#: after a rollback, cost round trips the package cannot see: off here, shown below.
NO_PREPARE = {"psycopg": {"prepare_threshold": None}, "asyncpg": {}}


@pytest.mark.usefixtures("tables")
@pytest.mark.parametrize("pre_ping", [False, True], ids=["no-ping", "pre-ping"])
async def test_round_trips_are_those_the_server_was_sent(
    postgresql_url: str, proxy: DelayingProxy, pre_ping: bool
) -> None:
    driver = driver_of(postgresql_url)
    db = Database(
        through(postgresql_url, proxy),
        stats=True,
        pool_pre_ping=pre_ping,
        connect_args=NO_PREPARE[driver],
    )
    try:
        for work, status, _ in KINDS.values():  # warm: a connection, statements prepared
            await request_stats(db, work, status)
        counted: dict[str, tuple[int, int]] = {}
        for kind, (work, status, _) in KINDS.items():
            proxy.reset()
            stats = await request_stats(db, work, status)
            counted[kind] = (stats.round_trips, proxy.round_trips)
    finally:
        await db.dispose()

    ping = PING[driver] if pre_ping else 0
    expected = {kind: (trips + ping, trips + ping) for kind, (_, _, trips) in KINDS.items()}
    expected["no database use"] = (0, 0)  # no checkout, no ping
    assert counted == expected


@pytest.mark.usefixtures("tables")
async def test_a_new_connection_is_not_pinged(postgresql_url: str, proxy: DelayingProxy) -> None:
    db = Database(through(postgresql_url, proxy), stats=True, pool_pre_ping=True)
    try:
        first = await request_stats(db, one_read, 200)
        proxy.reset()
        second = await request_stats(db, one_read, 200)
        sent = proxy.round_trips
    finally:
        await db.dispose()

    driver = driver_of(postgresql_url)
    assert (first.round_trips, second.round_trips) == (3, 3 + PING[driver])
    # asyncpg prepares the ping's empty statement on its first use too.
    assert sent == 3 + PING[driver] + (1 if driver == "asyncpg" else 0)


async def new_statement(db: Database) -> None:
    await db.session.execute(text(f"SELECT '{uuid.uuid4().hex}'"))


async def same_statement(db: Database) -> None:
    await db.session.execute(text("SELECT 'again'"))


@pytest.mark.usefixtures("tables")
async def test_asyncpg_prepares_a_statement_on_its_first_use_on_a_connection_unseen(
    postgres_database: URL, proxy: DelayingProxy
) -> None:
    """asyncpg prepares each new statement (Parse, Describe: a round trip) before it
    binds and runs it, inside the one execution the package sees."""
    db = Database(through(asyncpg_url(postgres_database), proxy), stats=True)
    counted: list[tuple[int, int]] = []
    try:
        await request_stats(db, one_read, 200)  # the connection made
        for work in (new_statement, new_statement, same_statement, same_statement):
            proxy.reset()
            stats = await request_stats(db, work, 200)
            counted.append((stats.round_trips, proxy.round_trips))
    finally:
        await db.dispose()

    # (seen by the package, sent): BEGIN, the statement, COMMIT; + its preparation.
    assert counted == [(3, 4), (3, 4), (3, 4), (3, 3)]


@pytest.mark.usefixtures("tables")
async def test_psycopg_prepares_a_statement_run_often_and_deallocates_after_a_rollback_unseen(
    postgres_database: URL, proxy: DelayingProxy
) -> None:
    """psycopg prepares a statement on its sixth run on a connection (prepare_threshold
    5: a Parse of its own), and after a ROLLBACK sends DEALLOCATE ALL if it had prepared
    any; both outside the executions the package sees."""
    url = postgres_database.set(drivername="postgresql+psycopg").render_as_string(False)
    db = Database(through(url, proxy), stats=True)
    counted: list[tuple[int, int]] = []
    try:
        await request_stats(db, one_read, 200)  # the connection made
        for status in (200,) * 7 + (500, 200):
            proxy.reset()
            stats = await request_stats(db, same_statement, status)
            counted.append((stats.round_trips, proxy.round_trips))
    finally:
        await db.dispose()

    # (seen by the package, sent): BEGIN, the statement, COMMIT or ROLLBACK; + the
    # preparation on the sixth run, + DEALLOCATE ALL after the rollback, which also
    # forgets the counts (the ninth run is a first again).
    assert counted == [(3, 3)] * 5 + [(3, 4), (3, 3), (3, 4), (3, 3)]
