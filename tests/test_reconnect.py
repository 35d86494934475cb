"""A dead pooled connection met by a transaction's first statement: replaced, unseen.

Without ``pool_pre_ping``, a restart of the database (or its backends killed, or closed
by ``idle_session_timeout``) used to fail the first request that drew a dead connection.
Now that request's first statement runs again on a new connection (``_reconnect``),
and every request succeeds, for asyncpg and psycopg (``Database``) and psycopg and
psycopg2 (``SyncDatabase``, ``def`` endpoints in worker threads).  What is not re-run
keeps its answer: a dead connection met by a later statement, a flush or the COMMIT
is a 503 with Retry-After and nothing is committed.  The normal path costs no round
trip more (counted at the delaying proxy of ``benchmarks/proxy.py``).

A PostgreSQL cluster of this module's own, restarted by the tests.
"""

from __future__ import annotations

import contextlib
import logging
import re
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from psycopg import sql
from sqlalchemy import URL, create_engine, event, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_sqla import Database, SQLAlchemyMiddleware, SyncDatabase
from asgi_sqla.pytest_plugin import rolled_back
from asgi_sqla.types import ASGIApp
from benchmarks.proxy import DelayingProxy

import _postgres
from _helpers import (
    ASGIRecorder,
    DedicatedPostgres,
    eventually,
    http_scope,
    items,
    metadata,
    postgres_unavailable,
)

pytestmark = pytest.mark.anyio

#: The log line said once per invalidation of the pool.
DEAD_POOL = "pooled database connections were dead"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __table__ = items


@pytest.fixture(scope="module")
def own_pg() -> Iterator[DedicatedPostgres]:
    """A cluster this module may restart, with the role ``app`` (a checked password)."""
    try:
        with DedicatedPostgres() as cluster:
            cluster.add_password_role("app", "app-secret")
            yield cluster
    except _postgres.PostgresUnavailable as exc:
        postgres_unavailable(str(exc))


@pytest.fixture
def own_database(own_pg: DedicatedPostgres) -> Iterator[URL]:
    """A fresh database owned by ``app``, with ``items``: its driver-less URL."""
    database = f"t_{uuid.uuid4().hex}"
    name = sql.Identifier(database)
    with _postgres.connect(own_pg.admin) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} OWNER app TEMPLATE template0").format(name))
    url = own_pg.admin.set(username="app", password="app-secret", database=database)
    engine = create_engine(url.set(drivername="postgresql+psycopg"))
    with engine.begin() as connection:
        metadata.create_all(connection)
    engine.dispose()
    try:
        yield url
    finally:
        if not own_pg.running:  # a failed test may have left it stopped
            own_pg.start()
        with _postgres.connect(own_pg.admin) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(name))


#: (flavour, driver): a ``Database`` with an async driver, or a ``SyncDatabase``.
FLAVOURS = [("async", "asyncpg"), ("async", "psycopg"), ("sync", "psycopg"), ("sync", "psycopg2")]


@pytest.fixture(
    params=[pytest.param(f, marks=pytest.mark.postgresql, id="-".join(f)) for f in FLAVOURS]
)
def flavour(request: pytest.FixtureRequest) -> tuple[str, str]:
    kind, driver = request.param
    return kind, driver


@dataclass
class Served:
    """A Starlette app over a database of one flavour, and its database."""

    db: Database | SyncDatabase
    app: ASGIApp

    @property
    def sync(self) -> bool:
        return isinstance(self.db, SyncDatabase)

    async def fill_pool(self, size: int) -> None:
        """Make the pool hold ``size`` connections that have served a statement."""
        db = self.db
        if isinstance(db, Database):
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(size):
                    connection = await stack.enter_async_context(db.engine.connect())
                    await connection.execute(text("SELECT 1"))
        else:

            def fill() -> None:
                with contextlib.ExitStack() as stack:
                    for _ in range(size):
                        connection = stack.enter_context(db.engine.connect())
                        connection.execute(text("SELECT 1"))

            await anyio.to_thread.run_sync(fill)
        assert db.pool_status().checked_in == size

    def keys(self) -> set[str]:
        engine = create_engine(self.db.engine.url.set(drivername="postgresql+psycopg"))
        try:
            with engine.connect() as connection:
                return set(connection.execute(select(items.c.key)).scalars())
        finally:
            engine.dispose()

    def checked_out(self) -> int:
        return self.db.pool_status().checked_out


Step = Callable[[Any, str], None]


def serve(flavour: tuple[str, str], url: URL, **options: Any) -> Served:
    """An app whose ``/write?key=K`` writes K and answers 201 with ``reconnects`` in the body.

    ``/two?key=K`` runs a first statement, waits until the test says (the ``between``
    event of ``app.state``), then writes K.  ``/add?key=K`` only adds an ORM object: the
    flush at the commit is the transaction's first statement.
    """
    kind, driver = flavour
    options = {"pool_size": 3, "max_overflow": 0, "pool_timeout": 5, "stats": True, **options}
    if kind == "async":
        db: Database | SyncDatabase = Database(
            url.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False),
            **options,
        )
    else:
        db = SyncDatabase(
            url.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False),
            **options,
        )

    def answer(key: str) -> Response:
        stats = db.stats
        assert stats is not None
        return PlainTextResponse(f"{key} {stats.reconnects}", status_code=201)

    if kind == "async":
        adb = db
        assert isinstance(adb, Database)

        async def write(request: Request) -> Response:
            key = request.query_params["key"]
            await adb.session.execute(items.insert().values(key=key))
            return answer(key)

        async def two(request: Request) -> Response:
            key = request.query_params["key"]
            pid = await adb.session.scalar(text("SELECT pg_backend_pid()"))
            await request.app.state.between(pid)
            await adb.session.execute(items.insert().values(key=key))
            return answer(key)

        async def add(request: Request) -> Response:
            key = request.query_params["key"]
            adb.session.add(Item(key=key))
            return answer(key)

        async def read(request: Request) -> Response:
            key = request.query_params["key"]
            (await adb.session.execute(select(items.c.key).where(items.c.key == key))).all()
            return PlainTextResponse("read")

        async def autoflush(request: Request) -> Response:
            key = request.query_params["key"]
            adb.session.add(Item(key=key))
            # One call, two statements: the autoflush's INSERT, then the SELECT.  An ORM
            # select: SQLAlchemy 2.0 autoflushes before those only, 2.1 before any.
            (await adb.session.execute(select(Item).where(items.c.key == key))).all()
            return answer(key)

        endpoints: list[Any] = [write, two, add, read, autoflush]
    else:
        sdb = db
        assert isinstance(sdb, SyncDatabase)

        def swrite(request: Request) -> Response:
            key = request.query_params["key"]
            sdb.session.execute(items.insert().values(key=key))
            return answer(key)

        def stwo(request: Request) -> Response:
            key = request.query_params["key"]
            pid = sdb.session.scalar(text("SELECT pg_backend_pid()"))
            anyio.from_thread.run(request.app.state.between, pid)
            sdb.session.execute(items.insert().values(key=key))
            return answer(key)

        def sadd(request: Request) -> Response:
            key = request.query_params["key"]
            sdb.session.add(Item(key=key))
            return answer(key)

        def sread(request: Request) -> Response:
            key = request.query_params["key"]
            sdb.session.execute(select(items.c.key).where(items.c.key == key)).all()
            return PlainTextResponse("read")

        def sautoflush(request: Request) -> Response:
            key = request.query_params["key"]
            sdb.session.add(Item(key=key))
            sdb.session.execute(select(Item).where(items.c.key == key)).all()
            return answer(key)

        endpoints = [swrite, stwo, sadd, sread, sautoflush]
    app = Starlette(
        routes=[
            Route(f"/{name}", endpoint, methods=["POST"])
            for name, endpoint in zip(
                ("write", "two", "add", "read", "autoflush"), endpoints, strict=True
            )
        ],
        middleware=[Middleware(SQLAlchemyMiddleware, db)],
    )
    return Served(db, app)


async def post(app: ASGIApp, path: str, key: str) -> ASGIRecorder:
    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    with anyio.fail_after(20):
        await recorder(app, http_scope(path, method="POST", query_string=f"key={key}".encode()))
    return recorder


def status(recorder: ASGIRecorder) -> int:
    [start] = [m for m in recorder.sent if m["type"] == "http.response.start"]
    return int(start["status"])


def retry_after(recorder: ASGIRecorder) -> list[bytes]:
    [start] = [m for m in recorder.sent if m["type"] == "http.response.start"]
    return [value for name, value in start["headers"] if name.lower() == b"retry-after"]


async def dispose(served: Served) -> None:
    if isinstance(served.db, Database):
        await served.db.dispose()
    else:
        served.db.dispose()


async def all_at_once(served: Served, keys: list[str]) -> list[ASGIRecorder]:
    """Write each key in a request of its own, all started together."""
    answers: list[ASGIRecorder] = []

    async def one(key: str) -> None:
        answers.append(await post(served.app, "/write", key))

    async with anyio.create_task_group() as group:
        for key in keys:
            group.start_soon(one, key)
    return answers


def reconnects(answers: list[ASGIRecorder]) -> int:
    return sum(int(a.body.split()[1]) for a in answers)


# -- the pooled connections all dead: every request succeeds ------------------------------


async def assert_all_succeed_on_a_dead_pool(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests on a pool of 3 dead connections: all 201, committed, one log line."""
    caplog.set_level(logging.DEBUG, logger="asgi_sqla")
    first = await all_at_once(served, ["a0", "a1", "a2"])
    later = [await post(served.app, "/write", f"b{n}") for n in range(3)]
    assert [status(a) for a in first + later] == [201] * 6
    assert served.keys() == {"a0", "a1", "a2", "b0", "b1", "b2"}
    assert served.checked_out() == 0
    # The requests that drew a dead connection ran their statement again (at least the
    # first; the pool replaces the others once it knows); the later ones needed not.
    assert reconnects(first) >= 1
    assert reconnects(later) == 0
    infos = [r for r in caplog.records if DEAD_POOL in r.getMessage()]
    assert [r.levelno for r in infos] == [logging.INFO]


async def test_after_a_restart_without_pre_ping_every_request_succeeds(
    own_pg: DedicatedPostgres,
    own_database: URL,
    flavour: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    served = serve(flavour, own_database)
    try:
        await served.fill_pool(3)
        await anyio.to_thread.run_sync(own_pg.restart)
        await assert_all_succeed_on_a_dead_pool(served, caplog)
    finally:
        await dispose(served)


async def test_after_its_backends_were_killed_every_request_succeeds(
    own_pg: DedicatedPostgres,
    own_database: URL,
    flavour: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    served = serve(flavour, own_database)
    database = own_database.database
    assert database is not None
    try:
        await served.fill_pool(3)
        with _postgres.connect(own_pg.admin) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (database,),
            )
        assert eventually(lambda: own_pg.backends(database) == [])
        await assert_all_succeed_on_a_dead_pool(served, caplog)
    finally:
        await dispose(served)


async def test_after_idle_session_timeout_closed_them_every_request_succeeds(
    own_pg: DedicatedPostgres,
    own_database: URL,
    flavour: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    database = own_database.database
    assert database is not None
    with _postgres.connect(own_pg.admin) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} SET idle_session_timeout = '300ms'").format(
                sql.Identifier(database)
            )
        )
    served = serve(flavour, own_database)
    try:
        await served.fill_pool(3)
        # The server closes each of them once idle for 300 ms (PostgreSQL 14+).
        assert eventually(lambda: own_pg.backends(database) == [])
        await assert_all_succeed_on_a_dead_pool(served, caplog)
    finally:
        await dispose(served)


async def test_while_the_database_stays_down_the_request_gets_503_with_retry_after(
    own_pg: DedicatedPostgres, own_database: URL, flavour: tuple[str, str]
) -> None:
    """The new connection is refused too: answered as before, without a third try."""
    served = serve(flavour, own_database)
    try:
        await served.fill_pool(3)
        await anyio.to_thread.run_sync(own_pg.stop)
        try:
            down = await post(served.app, "/write", "down")
            assert (status(down), retry_after(down)) == (503, [b"1"])
            assert served.checked_out() == 0
        finally:
            await anyio.to_thread.run_sync(own_pg.start)
        assert status(await post(served.app, "/write", "up")) == 201
        assert served.keys() == {"up"}
    finally:
        await dispose(served)


# -- what is not re-run -------------------------------------------------------------------


async def test_a_connection_lost_after_the_first_statement_is_a_503_and_commits_nothing(
    own_pg: DedicatedPostgres, own_database: URL, flavour: tuple[str, str]
) -> None:
    served = serve(flavour, own_database)

    async def kill(pid: int) -> None:
        with _postgres.connect(own_pg.admin) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        database = own_database.database
        assert database is not None
        assert eventually(lambda: all(p != pid for p, _, _ in own_pg.backends(database)))

    served.app.state.between = kill  # type: ignore[attr-defined]
    try:
        answer = await post(served.app, "/two", "second")
        assert (status(answer), retry_after(answer)) == (503, [b"1"])
        assert served.keys() == set()
        assert served.checked_out() == 0
        assert status(await post(served.app, "/write", "next")) == 201
    finally:
        await dispose(served)


async def test_a_flush_that_meets_a_dead_connection_is_not_re_run(
    own_pg: DedicatedPostgres, own_database: URL, flavour: tuple[str, str]
) -> None:
    """The flush at the commit is the first statement: SQLAlchemy's rollback of the failed
    flush has expunged the object, so there is nothing left to re-run.  503, nothing
    committed; the pool is renewed for the next request."""
    served = serve(flavour, own_database, pool_size=1)
    try:
        await served.fill_pool(1)
        await anyio.to_thread.run_sync(own_pg.restart)
        answer = await post(served.app, "/add", "flushed")
        assert (status(answer), retry_after(answer)) == (503, [b"1"])
        assert served.keys() == set()
        assert served.checked_out() == 0
        assert status(await post(served.app, "/add", "next")) == 201
        assert served.keys() == {"next"}
    finally:
        await dispose(served)


async def test_a_statement_after_an_answered_one_of_the_same_call_is_not_re_run(
    own_pg: DedicatedPostgres, own_database: URL, flavour: tuple[str, str]
) -> None:
    """An autoflush's INSERT is answered, then the connection dies before the SELECT of
    the same call.  The call took the connection, but re-running the SELECT on a new one
    would commit without the INSERT, which died with the old connection, and answer 201:
    a 503, nothing committed."""
    served = serve(flavour, own_database)
    database = own_database.database
    assert database is not None

    killed: list[str] = []

    def kill_before_the_select(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and not killed:
            killed.append(statement)
            with _postgres.connect(own_pg.admin) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (database,),
                )
            assert eventually(lambda: not own_pg.backends(database))

    db = served.db
    sync_engine = db.engine.sync_engine if isinstance(db, Database) else db.engine
    event.listen(sync_engine, "before_cursor_execute", kill_before_the_select)
    try:
        answer = await post(served.app, "/autoflush", "flushed")
        assert len(killed) == 1
        assert (status(answer), retry_after(answer)) == (503, [b"1"])
        event.remove(sync_engine, "before_cursor_execute", kill_before_the_select)
        assert served.keys() == set()
        assert served.checked_out() == 0
        assert status(await post(served.app, "/autoflush", "next")) == 201
        assert served.keys() == {"next"}
    finally:
        if event.contains(sync_engine, "before_cursor_execute", kill_before_the_select):
            event.remove(sync_engine, "before_cursor_execute", kill_before_the_select)
        await dispose(served)


# -- the normal path: no round trip more ------------------------------------------------


async def round_trips_of_a_read(served: Served, proxy: DelayingProxy) -> int:
    """Round trips of a one-SELECT request on a warm pool (its statement prepared)."""
    for _ in range(2):
        assert status(await post(served.app, "/read", "x")) == 200
    proxy.reset()
    assert status(await post(served.app, "/read", "x")) == 200
    return proxy.round_trips


async def hand_written_read(url: URL, driver: str, proxy: DelayingProxy) -> int:
    """The same transaction without any middleware: an engine, begin(), one SELECT."""
    engine = create_async_engine(url.set(drivername=f"postgresql+{driver}"), pool_size=1)
    statement = select(items.c.key).where(items.c.key == "x")
    try:
        for _ in range(2):
            async with engine.begin() as connection:
                (await connection.execute(statement)).all()
        proxy.reset()
        async with engine.begin() as connection:
            (await connection.execute(statement)).all()
        return proxy.round_trips
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "driver", [pytest.param(d, marks=pytest.mark.postgresql) for d in ("asyncpg", "psycopg")]
)
async def test_a_one_read_request_costs_the_round_trips_of_hand_written_code(
    own_pg: DedicatedPostgres, own_database: URL, driver: str
) -> None:
    """Counted at the proxy, on a warm pool: as many as an engine's transaction without
    any middleware (BEGIN, SELECT, COMMIT); ``pool_pre_ping`` adds its ping."""
    host, port = own_database.host, own_database.port
    assert host is not None
    assert port is not None
    with DelayingProxy(host, port, delay=0.0) as proxy:
        via_proxy = own_database.set(port=proxy.port)
        plain = serve(("async", driver), via_proxy, pool_size=1)
        pinged = serve(("async", driver), via_proxy, pool_size=1, pool_pre_ping=True)
        try:
            counts = (
                await hand_written_read(via_proxy, driver, proxy),
                await round_trips_of_a_read(plain, proxy),
                await round_trips_of_a_read(pinged, proxy),
            )
        finally:
            await dispose(plain)
            await dispose(pinged)
    by_hand, with_reconnect, with_pre_ping = counts
    assert with_reconnect == by_hand == 3, counts
    assert with_pre_ping > with_reconnect, counts


# -- docs/restarts.md ---------------------------------------------------------------------

DOCS_PAGE = Path(__file__).resolve().parent.parent / "docs/guides/restarts.md"


def test_the_page_has_one_python_block() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOCS_PAGE.read_text(), re.DOTALL)
    assert [block.splitlines()[0] for block in blocks] == ["# restart_app.py"]


@pytest.mark.postgresql
async def test_the_page_s_app_counts_the_statement_run_again_after_a_restart(
    own_pg: DedicatedPostgres, own_database: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    [block] = re.findall(r"```python\n(.*?)```", DOCS_PAGE.read_text(), re.DOTALL)
    url = own_database.set(drivername="postgresql+asyncpg")
    monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))
    module = types.ModuleType("restart_app")
    exec(compile(block, "docs/restart_app.py", "exec"), module.__dict__)

    async def get() -> ASGIRecorder:
        recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
        with anyio.fail_after(20):
            await recorder(module.app, http_scope("/"))
        return recorder

    try:
        assert (await get()).body == b"reconnects: 0"  # the pool now holds a connection
        await anyio.to_thread.run_sync(own_pg.restart)
        assert [(await get()).body for _ in range(2)] == [b"reconnects: 1", b"reconnects: 0"]
    finally:
        await module.db.dispose()


# -- the pytest plugin's connection ----------------------------------------------------------


@pytest.mark.postgresql
async def test_a_test_s_connection_found_dead_is_not_replaced(
    own_pg: DedicatedPostgres, own_database: URL
) -> None:
    """Under ``rolled_back()`` sessions are bound to the test's connection, whose
    transaction the test rolls back: a new connection would commit behind its back.  The
    statement fails (503), and nothing is run again."""
    served = serve(("async", "asyncpg"), own_database)
    db = served.db
    assert isinstance(db, Database)
    database = own_database.database
    assert database is not None
    try:
        async with rolled_back(db):
            with _postgres.connect(own_pg.admin) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (database,),
                )
            assert eventually(lambda: own_pg.backends(database) == [])
            answer = await post(served.app, "/write", "in-test")
            assert (status(answer), retry_after(answer)) == (503, [b"1"])
        assert served.keys() == set()
    finally:
        await dispose(served)
