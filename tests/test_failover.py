"""Failover: the database unavailable is answered 503 with Retry-After, and nothing lies.

* A real failover: a primary (``DedicatedPostgres``) and its streaming standby
  (``StreamingReplica``); the app's URL names both hosts with
  ``target_session_attrs=read-write``.  While concurrent requests write, the primary is
  stopped (``pg_ctl stop -m fast``) and the standby promoted.  Every answer is a 201 or a
  503 with Retry-After, every 201's row is on the new primary and no other row is,
  nothing stays checked out, and requests succeed after the promotion without a
  restart of the app.  A COMMIT the shutdown cut after the server committed would be
  such another row; the app asks the new primary about it (``confirm_lost_commits``).
  A fast shutdown loses no acknowledged commit to the standby: the
  walsenders send all WAL up to the shutdown checkpoint, and wait for the standby to
  flush it, before the server exits (``WalSndDone`` in PostgreSQL's walsender.c); the
  clusters' ``synchronous_commit = off`` only delays the local WAL flush, which the
  shutdown checkpoint does.
* A server turned read-only under a live pool (SQLSTATE 25006, the Aurora and Patroni
  case), and a pool pointed at a hot standby: the write is answered 503, its connection
  is invalidated rather than pooled, and requests succeed once the server is writable.
  A write in a ``read_only`` route keeps its 500, and its connection.
* Which errors count: a refused connection is a 503; the same exception raised by the
  app's own code is not.  A connection that asyncpg finds ended between two round trips
  (the backend's FATAL read before its end, the failover's "cannot switch to state"
  error, which SQLAlchemy before 2.0.50 does not translate) is a 503 whether the
  statement, the COMMIT or the next pre-ping meets it; the same error class on a live
  connection is the app's 500.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import pytest
from sqlalchemy import URL, text
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_sqla import Database, SQLAlchemyMiddleware, SyncDatabase
from asgi_sqla.types import ASGIApp, Receive, Scope, Send

import _postgres
from _helpers import (
    PG_DRIVERS,
    ASGIRecorder,
    DedicatedPostgres,
    TcpRelay,
    eventually,
    http_scope,
    plain_response,
    postgres_unavailable,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgresql]


AnyDatabase = Database | SyncDatabase


# -- the app -------------------------------------------------------------------------------


@dataclass
class WriterApp:
    """``POST /write?key=K`` inserts ``K`` (201); ``GET /read`` counts rows (200).

    ``/ro/...`` are the same routes in a ``read_only`` route.  Every request notes the
    backend pid it ran on in :attr:`pids`, before it writes.
    """

    db: AnyDatabase
    app: ASGIApp
    pids: list[int] = field(default_factory=list)


def writer_app(flavour: str, url: str, **options: Any) -> WriterApp:
    insert = text("INSERT INTO items (key) VALUES (:key)")
    pid = text("SELECT pg_backend_pid()")
    count = text("SELECT count(*) FROM items")
    pids: list[int] = []
    db: AnyDatabase
    if flavour.startswith("sync-"):
        sync_db = db = SyncDatabase(url, **options)

        def write(request: Request) -> Response:
            pids.append(sync_db.session.execute(pid).scalar_one())
            sync_db.session.execute(insert, {"key": request.query_params["key"]})
            return PlainTextResponse("created", status_code=201)

        def read(request: Request) -> Response:
            pids.append(sync_db.session.execute(pid).scalar_one())
            return PlainTextResponse(str(sync_db.session.execute(count).scalar_one()))

        routes = [Route("/write", write, methods=["POST"]), Route("/read", read)]
    else:
        async_db = db = Database(url, **options)

        async def write_async(request: Request) -> Response:
            pids.append((await async_db.session.execute(pid)).scalar_one())
            await async_db.session.execute(insert, {"key": request.query_params["key"]})
            return PlainTextResponse("created", status_code=201)

        async def read_async(request: Request) -> Response:
            pids.append((await async_db.session.execute(pid)).scalar_one())
            return PlainTextResponse(str((await async_db.session.execute(count)).scalar_one()))

        routes = [Route("/write", write_async, methods=["POST"]), Route("/read", read_async)]
    routes += [Route("/ro" + r.path, r.endpoint, methods=r.methods) for r in routes]
    app = SQLAlchemyMiddleware(Starlette(routes=routes), db, retry_after=2, read_only=["/ro/*"])
    return WriterApp(db, app, pids)


@dataclass
class Answer:
    key: str
    status: int | None  # None: the exception reached the server, which answers 500
    retry_after: bytes | None
    body: bytes
    began: float
    error: str = ""  # the exception that reached the server, if one did
    raised: Exception | None = None  # the same exception


async def call(app: ASGIApp, path: str, key: str = "", method: str = "POST") -> Answer:
    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    scope = http_scope(path, method=method, query_string=f"key={key}".encode())
    began = time.monotonic()
    raised = None
    try:
        await recorder(app, scope)
    except Exception as exc:  # reaching the server: it answers 500 if nothing started
        raised = exc
    error = "" if raised is None else repr(raised)
    starts = [m for m in recorder.sent if m["type"] == "http.response.start"]
    if not starts:
        return Answer(key, None, None, b"", began, error, raised)
    headers = dict(starts[0]["headers"])
    status = starts[0]["status"]
    return Answer(key, status, headers.get(b"retry-after"), recorder.body, began, error, raised)


def checked_out(db: AnyDatabase) -> int:
    return db.pool_status().checked_out


async def dispose(db: AnyDatabase) -> None:
    if isinstance(db, Database):
        await db.dispose()
    else:
        db.dispose()


def rows(url: URL) -> set[str]:
    with _postgres.connect(url) as conn:
        return {key for (key,) in conn.execute("SELECT key FROM items")}


# -- a real failover -----------------------------------------------------------------------


@dataclass
class Pair:
    """A primary and its streaming standby, both with an ``items`` table."""

    primary: DedicatedPostgres
    standby: _postgres.StreamingReplica

    def url(self, flavour: str) -> str:
        hosts = (f"127.0.0.1:{self.primary.admin.port}", f"127.0.0.1:{self.standby.port}")
        return URL.create(
            PG_DRIVERS[flavour],
            username="postgres",
            database="postgres",
            query={"host": hosts, "target_session_attrs": "read-write"},
        ).render_as_string(hide_password=False)


def make_table(admin: URL) -> None:
    with _postgres.connect(admin) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS items (key text PRIMARY KEY)")


@pytest.fixture
def pair() -> Iterator[Pair]:
    try:
        with DedicatedPostgres() as primary:
            make_table(primary.admin)
            standby = _postgres.StreamingReplica(primary.cluster.bindir, primary.admin)
            try:
                standby.start()
                yield Pair(primary, standby)
            finally:
                standby.stop()
    except _postgres.PostgresUnavailable as exc:
        postgres_unavailable(str(exc))


@dataclass
class Drill:
    answers: list[Answer]
    promoted_at: float
    stopped_at: float


async def fail_over_under_load(
    pair: Pair, app: ASGIApp, *, clients: int = 8, before: int = 40, after: int = 40
) -> Drill:
    """Requests from ``clients`` loops; after ``before`` answers the primary is stopped
    and the standby promoted; the run ends once ``after`` requests begun after the
    promotion were answered 201."""
    answers: list[Answer] = []
    switch_due, promoted, done = anyio.Event(), anyio.Event(), anyio.Event()
    times = {"stopped": 0.0, "promoted": 0.0}

    async def client(number: int) -> None:
        sequence = 0
        while not done.is_set():
            answer = await call(app, "/write", f"c{number}-{sequence}")
            sequence += 1
            answers.append(answer)
            if len(answers) >= before:
                switch_due.set()
            late = [a for a in answers if promoted.is_set() and a.began > times["promoted"]]
            if sum(a.status == 201 for a in late) >= after:
                done.set()

    async def switch() -> None:
        await switch_due.wait()
        times["stopped"] = time.monotonic()
        await anyio.to_thread.run_sync(pair.primary.stop, "fast")
        await anyio.to_thread.run_sync(pair.standby.promote)
        times["promoted"] = time.monotonic()
        promoted.set()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            group.start_soon(switch)
            for number in range(clients):
                group.start_soon(client, number)
    return Drill(answers, times["promoted"], times["stopped"])


@pytest.mark.parametrize("flavour", ["asyncpg", "psycopg", "sync-psycopg"])
async def test_a_failover_answers_201_or_503_with_retry_after_and_loses_no_commit(
    pair: Pair, flavour: str
) -> None:
    writer = writer_app(
        flavour,
        pair.url(flavour),
        pool_size=4,
        max_overflow=0,
        pool_pre_ping=True,
        confirm_lost_commits=10,  # a COMMIT cut by the shutdown is asked about
    )
    try:
        drill = await fail_over_under_load(pair, writer.app)
        eventually(lambda: checked_out(writer.db) == 0)
        leaked = checked_out(writer.db)
    finally:
        await dispose(writer.db)

    answers = drill.answers
    statuses = {a.status for a in answers}
    unavailable = [a for a in answers if a.status == 503]
    created = {a.key for a in answers if a.status == 201}
    committed = rows(pair.standby.url)  # the new primary
    assert statuses <= {201, 503}, sorted(statuses, key=str)
    assert unavailable, "no request met the switch"
    assert all(a.retry_after == b"2" for a in unavailable)
    assert created - committed == set(), "a 201 whose row is not on the new primary"
    assert committed - created == set(), "a row committed for a request told 503"
    assert leaked == 0
    after = [a for a in answers if a.began > drill.promoted_at]
    assert after
    assert all(a.status == 201 for a in after)


# -- a server turned read-only: SQLSTATE 25006 ---------------------------------------------


@pytest.fixture(scope="module")
def own_pg() -> Iterator[DedicatedPostgres]:
    """A cluster of this module's own: its configuration is changed by the tests."""
    try:
        with DedicatedPostgres() as cluster:
            make_table(cluster.admin)
            yield cluster
    except _postgres.PostgresUnavailable as exc:
        postgres_unavailable(str(exc))


def single_url(admin: URL, flavour: str) -> str:
    return admin.set(drivername=PG_DRIVERS[flavour]).render_as_string(hide_password=False)


def set_read_only(admin: URL, on: bool) -> None:
    """Turn ``default_transaction_read_only`` on or off for every session of the server.

    Returns once a new session sees it: the postmaster has reloaded its configuration,
    and so has signalled every backend to, which they do before their next command.
    """
    with _postgres.connect(admin) as conn:
        if on:
            conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        else:
            conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
        conn.execute("SELECT pg_reload_conf()")

    def seen() -> bool:
        with _postgres.connect(admin) as conn:
            row = conn.execute("SHOW default_transaction_read_only").fetchone()
        return row is not None and row[0] == ("on" if on else "off")

    assert eventually(seen)


def backend_alive(admin: URL, pid: int) -> bool:
    with _postgres.connect(admin) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
        found = row.fetchone()
    return found is not None and found[0] == 1


READ_ONLY_FLAVOURS = pytest.mark.parametrize("flavour", list(PG_DRIVERS))


@READ_ONLY_FLAVOURS
async def test_a_server_turned_read_only_under_a_live_pool_answers_503_and_replaces_the_connection(
    own_pg: DedicatedPostgres, flavour: str
) -> None:
    admin = own_pg.admin
    writer = writer_app(flavour, single_url(admin, flavour), pool_size=1, max_overflow=0)
    try:
        assert (await call(writer.app, "/write", f"{flavour}-before")).status == 201
        [first] = writer.pids

        set_read_only(admin, True)
        try:
            refused = await call(writer.app, "/write", f"{flavour}-read-only")
            again = await call(writer.app, "/write", f"{flavour}-still-read-only")
        finally:
            set_read_only(admin, False)
        after = await call(writer.app, "/write", f"{flavour}-after")
        assert checked_out(writer.db) == 0
    finally:
        await dispose(writer.db)

    assert (refused.status, refused.retry_after) == (503, b"2"), refused
    # The pooled connection served the refused write, and was invalidated: the next
    # request ran on a new backend, and the old one is gone.
    assert writer.pids[1] == first
    assert writer.pids[2] != first
    assert eventually(lambda: not backend_alive(admin, first))
    assert (again.status, again.retry_after) == (503, b"2")
    assert after.status == 201
    assert rows(admin) >= {f"{flavour}-before", f"{flavour}-after"}
    assert not rows(admin) & {f"{flavour}-read-only", f"{flavour}-still-read-only"}


@READ_ONLY_FLAVOURS
async def test_a_write_in_a_read_only_route_keeps_its_500_and_its_connection(
    own_pg: DedicatedPostgres, flavour: str
) -> None:
    writer = writer_app(flavour, single_url(own_pg.admin, flavour), pool_size=1, max_overflow=0)
    try:
        refused = await call(writer.app, "/ro/write", f"{flavour}-in-read-only-route")
        again = await call(writer.app, "/ro/write", f"{flavour}-in-read-only-route")
        written = await call(writer.app, "/write", f"{flavour}-outside")
        assert checked_out(writer.db) == 0
    finally:
        await dispose(writer.db)

    # SET TRANSACTION READ ONLY was the package's own: the 25006 is the app's mistake.
    assert refused.status in (500, None)
    assert refused.retry_after is None
    assert again.status in (500, None)
    assert again.retry_after is None
    assert written.status == 201
    assert len(set(writer.pids)) == 1, writer.pids  # one connection, never invalidated


@pytest.fixture(scope="module")
def hot_standby(own_pg: DedicatedPostgres) -> Iterator[URL]:
    standby = _postgres.StreamingReplica(own_pg.cluster.bindir, own_pg.admin)
    try:
        yield standby.start()
    finally:
        standby.stop()


@READ_ONLY_FLAVOURS
async def test_a_pool_pointed_at_a_hot_standby_answers_writes_503_and_serves_reads(
    hot_standby: URL, flavour: str
) -> None:
    writer = writer_app(flavour, single_url(hot_standby, flavour), pool_size=1, max_overflow=0)
    try:
        first = await call(writer.app, "/write", "on-standby")
        second = await call(writer.app, "/write", "on-standby-again")
        read = await call(writer.app, "/read", method="GET")
        again = await call(writer.app, "/read", method="GET")
        assert checked_out(writer.db) == 0
    finally:
        await dispose(writer.db)

    assert (first.status, first.retry_after) == (503, b"2")
    assert (second.status, second.retry_after) == (503, b"2")
    assert writer.pids[0] != writer.pids[1]  # the first write's connection was replaced
    assert read.status == again.status == 200
    assert writer.pids[2] == writer.pids[3]  # reads keep theirs


# -- which errors count ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("flavour", list(PG_DRIVERS))
async def test_a_database_that_refuses_connections_answers_503_with_retry_after(
    flavour: str,
) -> None:
    url = f"{PG_DRIVERS[flavour]}://postgres@127.0.0.1:{free_port()}/postgres"
    writer = writer_app(flavour, url)
    try:
        # Starlette answers 500 and re-raises; the middleware makes the 500 a 503.
        answer = await call(writer.app, "/write", "refused")
        assert checked_out(writer.db) == 0
    finally:
        await dispose(writer.db)
    assert (answer.status, answer.retry_after) == (503, b"2")


async def test_a_refused_connection_reaching_the_middleware_is_answered_503_by_it() -> None:
    db = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.session.execute(text("SELECT 1"))  # asyncpg: a bare ConnectionRefusedError

    try:
        answer = await call(SQLAlchemyMiddleware(app, db, retry_after=7), "/")
    finally:
        await db.dispose()
    assert (answer.status, answer.retry_after) == (503, b"7")
    assert answer.body == b"Service Unavailable: the database could not be reached. Retry shortly."


@pytest.mark.parametrize("raised", [ConnectionRefusedError, TimeoutError, OSError])
async def test_a_connection_error_of_the_apps_own_code_is_not_the_databases(
    raised: Callable[[str], Exception],
) -> None:
    db = Database("sqlite+aiosqlite://")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.session.execute(text("SELECT 1"))  # the database answers
        raise raised("another service refused")  # the app's own call failed

    try:
        answer = await call(SQLAlchemyMiddleware(app, db), "/")
    finally:
        await db.dispose()
    assert answer.status is None  # the exception reached the server: a 500, not a 503


async def test_a_read_that_failed_over_from_a_dead_replica_does_not_make_a_500_a_503(
    own_pg: DedicatedPostgres,
) -> None:
    """The replica refused the read session's connection; the primary served the read."""
    url = single_url(own_pg.admin, "asyncpg")
    dead = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres"
    db = Database(url, replicas=[dead])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.read_session.execute(text("SELECT count(*) FROM items"))
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"the app's own error"})

    try:
        answer = await call(SQLAlchemyMiddleware(app, db), "/")
    finally:
        await db.dispose()
    assert (answer.status, answer.retry_after) == (500, None)


# -- a connection ended between two round trips: asyncpg's "cannot switch to state" --------


class GoodbyeRelay(TcpRelay):
    """A TCP relay to a server that can hold the server's answers until it hangs up.

    After :meth:`hold`, what the server sends is kept until it closes the connection;
    then the answer the client waits for and the server's farewell (the FATAL
    ErrorResponse of a terminated backend) reach the client in one write, and the
    client's side stays open until the client writes or closes.  The client thus reads
    the farewell in the same read as its answer, before its next statement, and sees no
    end of the connection yet.  :attr:`reply` is what the client sent once it had the
    farewell (``b""``: it closed without a word).
    """

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self._holding = False
        self.held = threading.Event()  # the server's answers are being held
        self.replied = threading.Event()  # the client acted on the farewell
        self.reply: bytes | None = None

    def hold(self) -> None:
        """Hold the server's next answers until the server hangs up (see the class doc)."""
        self._holding = True

    def serve(self, client: socket.socket, server: socket.socket) -> None:
        farewell = threading.Event()  # passed on to the client
        for target in (self._up, self._down):
            threading.Thread(target=target, args=(client, server, farewell), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, farewell: threading.Event) -> None:
        data = b""
        with contextlib.suppress(OSError):
            while (data := client.recv(65536)) and not farewell.is_set():
                server.sendall(data)
        if farewell.is_set():
            self.reply = data
            self.replied.set()
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _down(
        self, client: socket.socket, server: socket.socket, farewell: threading.Event
    ) -> None:
        kept: list[bytes] = []
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if self._holding:
                    kept.append(data)
                    self.held.set()
                else:
                    client.sendall(data)
        with contextlib.suppress(OSError):
            if not kept:
                client.shutdown(socket.SHUT_WR)  # the server's end, passed on
                return
            self._holding = False
            farewell.set()  # first: what the client sends from now on answers it
            client.sendall(b"".join(kept))  # one write; the client's side stays open


@pytest.fixture
def relay(own_pg: DedicatedPostgres) -> Iterator[GoodbyeRelay]:
    admin = own_pg.admin
    assert admin.host is not None
    assert admin.port is not None
    relay = GoodbyeRelay(admin.host, admin.port)
    try:
        yield relay
    finally:
        relay.close()


#: SQLAlchemy translates asyncpg's InternalClientError into a DBAPI error from 2.0.50
#: (sqlalchemy#13241); before, it reaches the caller as asyncpg raised it.
TRANSLATES_INTERNAL_CLIENT_ERROR = hasattr(AsyncAdapt_asyncpg_dbapi, "InternalClientError")


@pytest.mark.parametrize("before", ["a statement", "the COMMIT", "the next checkout"])
async def test_a_connection_asyncpg_finds_ended_between_two_round_trips_is_answered_503(
    own_pg: DedicatedPostgres, relay: GoodbyeRelay, before: str
) -> None:
    """The backend is terminated, and the client reads its farewell with an answer, just
    before a statement, the COMMIT, or the next request's pre-ping: the request that meets
    the connection's end is answered 503 with Retry-After (never 500), nothing of it is
    committed, and the connection is replaced."""
    db = Database(
        own_pg.admin.set(drivername="postgresql+asyncpg", port=relay.port),
        pool_size=1,
        max_overflow=0,
        pool_pre_ping=True,
    )
    pid = text("SELECT pg_backend_pid()")
    pids: list[int] = []

    async def write(request: Request) -> Response:
        session = db.session
        pids.append((await session.execute(pid)).scalar_one())
        doomed = len(pids) == 1  # the request whose connection the server ends
        if doomed and before == "a statement":
            relay.hold()
            await session.execute(pid)  # answered together with the farewell
        await session.execute(
            text("INSERT INTO items (key) VALUES (:key)"), dict(request.query_params)
        )
        if doomed and before == "the COMMIT":
            relay.hold()
            await session.execute(pid)  # the same, then the COMMIT
        elif doomed and before == "the next checkout":
            relay.hold()  # the COMMIT's answer comes with the farewell: this request commits
        return PlainTextResponse("created", status_code=201)

    async def terminate_once_held() -> None:
        assert await anyio.to_thread.run_sync(relay.held.wait, 10)
        with _postgres.connect(own_pg.admin) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pids[-1],))

    app = SQLAlchemyMiddleware(
        Starlette(routes=[Route("/write", write, methods=["POST"])]), db, retry_after=2
    )
    key = f"goodbye-{before}"
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(terminate_once_held)
            first = await call(app, "/write", key)
        then = await call(app, "/write", f"{key}-then")
        after = await call(app, "/write", f"{key}-after")
        assert checked_out(db) == 0
    finally:
        await db.dispose()

    if before == "the next checkout":
        assert first.status == 201
        # From 2.0.50 the pre-ping replaces the connection, as for any dead one.
        met, expected = then, (201, None) if TRANSLATES_INTERNAL_CLIENT_ERROR else (503, b"2")
    else:
        met, expected = first, (503, b"2")
    # asyncpg read the farewell before its next statement, did not send that statement
    # ("cannot switch to state N; another operation (2) is in progress") and ended the
    # connection itself: its Terminate message.
    assert relay.replied.wait(10)
    assert relay.reply == b"X\x00\x00\x00\x04"
    assert (met.status, met.retry_after) == expected, met
    assert after.status == 201
    assert pids[-1] != pids[0]  # a new connection
    committed = rows(own_pg.admin)
    assert (key in committed) is (before == "the next checkout")
    assert f"{key}-after" in committed


async def test_an_asyncpg_internal_client_error_on_a_live_connection_stays_a_500(
    own_pg: DedicatedPostgres,
) -> None:
    """The same error class on a connection that is fine is the app's: a 500, and the
    connection is kept.  asyncpg raises its ``OutdatedSchemaCacheError`` (an
    ``InternalClientError``) when a composite type changed under its cached codec."""
    with _postgres.connect(own_pg.admin) as conn:
        conn.execute("DROP TYPE IF EXISTS pair; CREATE TYPE pair AS (a int, b int)")
    db = Database(single_url(own_pg.admin, "asyncpg"), pool_size=1, max_overflow=0)
    pids: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        pids.append((await db.session.execute(text("SELECT pg_backend_pid()"))).scalar_one())
        if scope["path"] == "/pair":
            await db.session.execute(text("SELECT ROW(1, 2)::pair"))
        await plain_response(send, 200)

    middleware = SQLAlchemyMiddleware(app, db, retry_after=2)
    try:
        assert (await call(middleware, "/pair")).status == 200
        with _postgres.connect(own_pg.admin) as conn:
            conn.execute("ALTER TYPE pair ADD ATTRIBUTE c int")
        outdated = await call(middleware, "/pair")
        after = await call(middleware, "/")
        assert checked_out(db) == 0
    finally:
        await db.dispose()

    assert (outdated.status, outdated.retry_after) == (None, None)  # reached the server: a 500
    raised = []
    cause: BaseException | None = outdated.raised
    while cause is not None:
        raised.append(cause)
        cause = cause.__cause__
    assert any(isinstance(e, asyncpg.exceptions.OutdatedSchemaCacheError) for e in raised), raised
    assert after.status == 200
    assert len(set(pids)) == 1, pids  # one connection all along


# -- the guide -------------------------------------------------------------------------------

GUIDE = Path(__file__).resolve().parent.parent / "docs/guides/failover.md"


async def test_the_failover_guide_examples_name_both_hosts_and_ask_for_the_writable_one() -> None:
    [block] = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    namespace: dict[str, Any] = {}
    exec(compile(block, str(GUIDE), "exec"), namespace)  # builds the databases, connects nowhere
    for db in (namespace["db"], namespace["sync_db"]):
        url = db.engine.url
        assert url.query["host"] == ("db1.internal:5432", "db2.internal:5432")
        assert url.query["target_session_attrs"] == "read-write"
        await dispose(db)
