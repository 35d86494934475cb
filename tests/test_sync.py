"""``SyncDatabase``: a synchronous ``Session`` per request, with the same three promises.

The app's ``def`` code runs in a worker thread, as frameworks run it (here through
``anyio.to_thread.run_sync``, which Starlette's ``run_in_threadpool`` is); the
middleware ends the session at response start in a thread of the package's own.  Every
test runs on SQLite, and PostgreSQL through psycopg 3 (used synchronously) and psycopg 2.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from typing import Any

import anyio
import httpx
import pytest
import sqlmodel
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from typing_extensions import assert_type

from asgi_sqla import (
    BlockingCallError,
    ConcurrentSessionUseError,
    ConfigurationError,
    Database,
    RollbackOnlyError,
    SessionEndedError,
    SQLAlchemyMiddleware,
    SyncDatabase,
)
from asgi_sqla.fastapi import session_dependency
from asgi_sqla.types import Message, Receive, Scope, Send

from _helpers import (
    ASGIRecorder,
    as_asgi_app,
    call_http,
    items,
    keys,
    open_database,
    plain_response,
    sync_checked_out,
    sync_keys,
)

pytestmark = pytest.mark.anyio


def add(db: SyncDatabase, key: str) -> None:
    """Insert ``key`` into ``items`` through ``db.session`` (in the request's thread)."""
    db.session.execute(items.insert().values(key=key))


def orphan(db: SyncDatabase) -> None:
    """A write whose COMMIT fails: a deferred foreign key to a parent that does not exist."""
    db.session.execute(text("INSERT INTO children (id, parent_id) VALUES (1, 999)"))


def threaded_app(work: Callable[[], object], status: int = 200) -> Callable[..., Any]:
    """A raw ASGI app that runs ``work`` in a worker thread, then answers ``status``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(work)
        await plain_response(send, status)

    return app


class Checkouts:
    """The threads in which ``db``'s connections were checked in, from now on."""

    def __init__(self, db: SyncDatabase) -> None:
        self.checkouts = 0
        self.checkin_threads: list[str] = []
        event.listen(db.engine.pool, "checkout", self._checkout)
        event.listen(db.engine.pool, "checkin", self._checkin)

    def _checkout(self, *args: object) -> None:
        self.checkouts += 1

    def _checkin(self, *args: object) -> None:
        self.checkin_threads.append(threading.current_thread().name)


# -- the status line ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 302])
async def test_a_response_below_400_commits_before_the_status_line(
    sync_db: SyncDatabase, status: int
) -> None:
    seen_at_start: list[tuple[set[str], int]] = []

    def on_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            seen_at_start.append((sync_keys(sync_db), sync_checked_out(sync_db)))

    app = SQLAlchemyMiddleware(threaded_app(lambda: add(sync_db, "written"), status), sync_db)
    recorder = await call_http(app, on_send=on_send)

    assert recorder.status == status
    assert seen_at_start == [({"written"}, 0)]


@pytest.mark.parametrize("status", [400, 404, 500])
async def test_a_response_of_400_or_more_rolls_back(sync_db: SyncDatabase, status: int) -> None:
    app = SQLAlchemyMiddleware(threaded_app(lambda: add(sync_db, "written"), status), sync_db)
    recorder = await call_http(app)

    assert recorder.status == status
    assert sync_keys(sync_db) == set()
    assert sync_checked_out(sync_db) == 0


async def test_an_app_that_raises_rolls_back(sync_db: SyncDatabase) -> None:
    def work() -> None:
        add(sync_db, "written")
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await call_http(SQLAlchemyMiddleware(threaded_app(work), sync_db))

    assert sync_keys(sync_db) == set()
    assert sync_checked_out(sync_db) == 0


async def test_a_failed_commit_answers_500_and_keeps_nothing(sync_db: SyncDatabase) -> None:
    def work() -> None:
        add(sync_db, "written")
        orphan(sync_db)

    recorder = await call_http(SQLAlchemyMiddleware(threaded_app(work, 201), sync_db))

    assert recorder.status == 500
    assert sync_keys(sync_db) == set()
    assert sync_checked_out(sync_db) == 0


async def test_the_commit_runs_in_a_worker_thread_not_the_event_loop(
    sync_db: SyncDatabase,
) -> None:
    checkouts = Checkouts(sync_db)
    loop_thread = threading.current_thread().name

    await call_http(SQLAlchemyMiddleware(threaded_app(lambda: add(sync_db, "k")), sync_db))

    assert checkouts.checkin_threads, "the connection was never given back"
    assert all(name == "AnyIO worker thread" for name in checkouts.checkin_threads)
    assert loop_thread not in checkouts.checkin_threads


# -- connections held only while needed ---------------------------------------------------


async def test_a_request_that_reads_the_session_but_runs_nothing_takes_no_connection(
    sync_db: SyncDatabase,
) -> None:
    checkouts = Checkouts(sync_db)
    sessions: list[Session] = []

    recorder = await call_http(
        SQLAlchemyMiddleware(threaded_app(lambda: sessions.append(sync_db.session)), sync_db)
    )

    assert recorder.status == 200
    assert len(sessions) == 1
    assert checkouts.checkouts == 0


async def test_the_connection_is_back_before_the_body_is_sent(sync_db: SyncDatabase) -> None:
    held_during_body: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(lambda: add(sync_db, "streamed"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        held_during_body.append(sync_checked_out(sync_db))
        await send({"type": "http.response.body", "body": b"x", "more_body": False})

    await call_http(SQLAlchemyMiddleware(app, sync_db))

    assert held_during_body == [0]
    assert sync_keys(sync_db) == {"streamed"}


# -- the event loop never waits on the database -------------------------------------------


async def test_a_call_from_the_event_loops_thread_is_refused(sync_db: SyncDatabase) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sync_db.session.execute(text("SELECT 1"))

    with pytest.raises(BlockingCallError, match="plain `def`"):
        await call_http(SQLAlchemyMiddleware(app, sync_db))
    assert sync_checked_out(sync_db) == 0


async def test_block_event_loop_allows_calls_from_the_event_loops_thread(
    sync_database_url: str,
) -> None:
    db = SyncDatabase(sync_database_url, block_event_loop=True)
    try:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            db.session.execute(text("SELECT 1"))
            await plain_response(send, 200)

        assert (await call_http(SQLAlchemyMiddleware(app, db))).status == 200
        with db.scope() as session:
            assert session.execute(text("SELECT 2")).scalar() == 2
    finally:
        db.dispose()


async def test_scope_and_release_are_refused_on_the_event_loop(sync_db: SyncDatabase) -> None:
    with pytest.raises(BlockingCallError), sync_db.scope():
        pass  # pragma: no cover -- refused on entry

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(lambda: add(sync_db, "k"))
        sync_db.release()

    with pytest.raises(BlockingCallError):
        await call_http(SQLAlchemyMiddleware(app, sync_db))
    assert sync_checked_out(sync_db) == 0


# -- one thread at a time -----------------------------------------------------------------


async def test_two_threads_using_one_session_at_once_get_the_concurrency_error(
    sync_db: SyncDatabase,
) -> None:
    inside = threading.Event()
    second_tried = threading.Event()
    errors: list[BaseException] = []

    @event.listens_for(sync_db.engine, "before_cursor_execute")
    def hold(*args: object) -> None:
        if threading.current_thread().name == "first":
            inside.set()
            assert second_tried.wait(10)

    def work() -> None:
        session = sync_db.session

        def first() -> None:
            session.execute(text("SELECT 1"))

        def second() -> None:
            assert inside.wait(10)
            try:
                session.execute(text("SELECT 2"))
            except BaseException as exc:
                errors.append(exc)
            finally:
                second_tried.set()

        threads = [threading.Thread(target=first, name="first"), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    recorder = await call_http(SQLAlchemyMiddleware(threaded_app(work), sync_db))

    assert recorder.status == 200
    assert len(errors) == 1, errors
    assert isinstance(errors[0], ConcurrentSessionUseError), errors
    assert "'first'" in str(errors[0])
    assert "db.new_session()" in str(errors[0])
    assert sync_checked_out(sync_db) == 0


async def test_threads_with_sessions_of_their_own_work_side_by_side(sync_db: SyncDatabase) -> None:
    def work() -> None:
        def write(key: str) -> None:
            with sync_db.new_session() as session:
                session.execute(items.insert().values(key=key))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(write, [f"k{i}" for i in range(8)]))

    await call_http(SQLAlchemyMiddleware(threaded_app(work, 400), sync_db))

    assert sync_keys(sync_db) == {f"k{i}" for i in range(8)}  # their own transactions
    assert sync_checked_out(sync_db) == 0


async def test_a_session_kept_past_the_response_refuses_new_calls(sync_db: SyncDatabase) -> None:
    kept: list[Session] = []

    def work() -> None:
        kept.append(sync_db.session)
        add(sync_db, "k")

    await call_http(SQLAlchemyMiddleware(threaded_app(work), sync_db))

    with pytest.raises(SessionEndedError):
        await anyio.to_thread.run_sync(lambda: kept[0].execute(text("SELECT 1")))
    assert sync_checked_out(sync_db) == 0


# -- the app's own controls ---------------------------------------------------------------


async def test_commit_release_and_rollback_in_the_request(sync_db: SyncDatabase) -> None:
    def work() -> None:
        add(sync_db, "committed")
        sync_db.commit()
        add(sync_db, "rolled-back")
        sync_db.rollback()
        add(sync_db, "released")
        sync_db.release()
        assert sync_checked_out(sync_db) == 0
        add(sync_db, "dropped")
        sync_db.release(commit=False)
        add(sync_db, "after")  # a new session: the response's status decides it

    await call_http(SQLAlchemyMiddleware(threaded_app(work, 400), sync_db))

    assert sync_keys(sync_db) == {"committed", "released"}
    assert sync_checked_out(sync_db) == 0


async def test_on_commit_callbacks_run_after_the_commit_and_never_after_a_rollback(
    sync_db: SyncDatabase,
) -> None:
    ran: list[tuple[str, set[str]]] = []

    def work(status: int) -> Callable[[], None]:
        def run() -> None:
            add(sync_db, f"k{status}")
            sync_db.on_commit(lambda: ran.append((f"k{status}", sync_keys(sync_db))))

        return run

    await call_http(SQLAlchemyMiddleware(threaded_app(work(201), 201), sync_db))
    await call_http(SQLAlchemyMiddleware(threaded_app(work(400), 400), sync_db))

    assert ran == [("k201", {"k201"})]


async def test_on_commit_refuses_a_coroutine_function(sync_db: SyncDatabase) -> None:
    async def callback() -> None:  # pragma: no cover -- refused
        pass

    def work() -> None:
        sync_db.on_commit(callback)

    with pytest.raises(ConfigurationError, match="plain function"):
        await call_http(SQLAlchemyMiddleware(threaded_app(work), sync_db))


async def test_set_rollback_only_rolls_back_a_2xx_and_refuses_commits(
    sync_db: SyncDatabase,
) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        add(sync_db, "k")
        sync_db.set_rollback_only()
        try:
            sync_db.session.commit()
        except RollbackOnlyError as exc:
            errors.append(exc)

    await call_http(SQLAlchemyMiddleware(threaded_app(work), sync_db))

    assert len(errors) == 1
    assert sync_keys(sync_db) == set()


@pytest.mark.parametrize(("status", "expected"), [(200, {"hand"}), (500, {"hand"})])
async def test_a_manual_commit_route_keeps_only_what_the_handler_committed(
    sync_db: SyncDatabase, status: int, expected: set[str]
) -> None:
    def work() -> None:
        add(sync_db, "hand")
        sync_db.commit()
        add(sync_db, "left")

    app = SQLAlchemyMiddleware(threaded_app(work, status), sync_db, manual_commit=["/"])
    await call_http(app)

    assert sync_keys(sync_db) == expected
    assert sync_checked_out(sync_db) == 0


async def test_a_read_only_route_never_commits_and_postgresql_refuses_its_writes(
    sync_db: SyncDatabase,
) -> None:
    refused: list[BaseException] = []

    def work() -> None:
        try:
            add(sync_db, "k")
        except DBAPIError as exc:
            refused.append(exc)

    await call_http(SQLAlchemyMiddleware(threaded_app(work), sync_db, read_only=["/"]))

    assert sync_keys(sync_db) == set()
    assert len(refused) == (1 if sync_db.engine.dialect.name == "postgresql" else 0)
    assert sync_checked_out(sync_db) == 0


# -- scripts, workers, websockets, several databases --------------------------------------


async def test_scope_commits_on_exit_and_rolls_back_on_an_error(sync_db: SyncDatabase) -> None:
    def script() -> None:
        with sync_db.scope() as session:
            session.execute(items.insert().values(key="kept"))
            assert sync_db.session is session

        def undone() -> None:
            with sync_db.scope():
                add(sync_db, "undone")
                raise KeyError

        def failing_commit() -> None:
            with sync_db.scope():
                orphan(sync_db)

        with pytest.raises(KeyError):
            undone()
        with pytest.raises(IntegrityError, match=r"(?i)foreign key"):
            failing_commit()

    await anyio.to_thread.run_sync(script)  # a thread without an event loop, as a script

    assert sync_keys(sync_db) == {"kept"}
    assert sync_checked_out(sync_db) == 0


def test_scope_works_in_a_plain_script(sync_database_url: str) -> None:
    from _helpers import open_sync_database

    db = open_sync_database(sync_database_url)
    try:
        with db.scope() as session:
            session.execute(items.insert().values(key="script"))
        with db.scope() as session:
            assert session.scalar(select(func.count()).select_from(items)) == 1
    finally:
        db.dispose()


async def test_a_websocket_commits_each_message_and_holds_nothing_while_idle(
    sync_db: SyncDatabase,
) -> None:
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text_ in websocket.iter_text():
            await run_in_threadpool(add, sync_db, text_)
            await websocket.send_text(text_)

    middleware = SQLAlchemyMiddleware(Starlette(routes=[WebSocketRoute("/ws", endpoint)]), sync_db)
    # What the server sees each time the app waits for a message: by then the
    # middleware has ended the message's transaction.
    idle: list[tuple[int, set[str]]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def waiting() -> Message:
            if scope["type"] == "websocket":
                idle.append((sync_checked_out(sync_db), sync_keys(sync_db)))
            return await receive()

        await middleware(scope, waiting, send)

    from httpx_ws import aconnect_ws
    from httpx_ws.transport import ASGIWebSocketTransport

    async with (
        httpx.AsyncClient(transport=ASGIWebSocketTransport(app), base_url="http://t") as client,
        aconnect_ws("/ws", client) as ws,  # type: ignore[var-annotated]
    ):
        for key in ("a", "b"):
            await ws.send_text(key)
            assert await ws.receive_text() == key

    assert (0, {"a"}) in idle, idle
    assert (0, {"a", "b"}) in idle, idle
    assert all(held == 0 for held, _ in idle), idle
    assert sync_checked_out(sync_db) == 0


@pytest.fixture
async def async_db(tmp_path: Any) -> AsyncIterator[Database]:
    database = await open_database(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
    try:
        yield database
    finally:
        await database.dispose()


async def test_an_async_and_a_sync_database_in_one_request(
    sync_db: SyncDatabase, async_db: Database
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await async_db.session.execute(items.insert().values(key="async"))
        await anyio.to_thread.run_sync(lambda: add(sync_db, "sync"))
        await plain_response(send, 201)

    recorder = await call_http(SQLAlchemyMiddleware(app, async_db, sync_db))

    assert recorder.status == 201
    assert await keys(async_db) == {"async"}
    assert sync_keys(sync_db) == {"sync"}


async def test_a_failed_sync_commit_rolls_back_the_databases_after_it(
    sync_db: SyncDatabase, async_db: Database
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(lambda: orphan(sync_db))  # first used: ends first
        await async_db.session.execute(items.insert().values(key="async"))
        await plain_response(send, 201)

    recorder = await call_http(SQLAlchemyMiddleware(app, async_db, sync_db))

    assert recorder.status == 500
    assert await keys(async_db) == set()
    assert sync_checked_out(sync_db) == 0


# -- Starlette and SQLModel ---------------------------------------------------------------


class Sidekick(sqlmodel.SQLModel, table=True):
    # Not "hero": examples/sqlmodel_app.py, imported by other tests of this process,
    # defines that table in the same SQLModel.metadata.
    id: int | None = sqlmodel.Field(default=None, primary_key=True)
    name: str


async def test_sqlmodel_sessions_in_starlette_def_endpoints(sync_database_url: str) -> None:
    db = SyncDatabase(sync_database_url, session_class=sqlmodel.Session, stats=True)
    sqlmodel.SQLModel.metadata.create_all(db.engine, tables=[Sidekick.__table__])  # type: ignore[attr-defined]

    def create(request: Request) -> PlainTextResponse:
        session = db.session
        assert isinstance(session, sqlmodel.Session)
        session.add(Sidekick(name=request.path_params["name"]))
        session.flush()
        return PlainTextResponse("created", status_code=201)

    def names(request: Request) -> PlainTextResponse:
        session = db.session
        assert isinstance(session, sqlmodel.Session)
        heroes = session.exec(sqlmodel.select(Sidekick).order_by(Sidekick.name)).all()
        stats = db.stats
        assert stats is not None
        assert stats.statements == 1
        return PlainTextResponse(",".join(hero.name for hero in heroes))

    app = SQLAlchemyMiddleware(
        Starlette(
            routes=[Route("/heroes/{name}", create, methods=["POST"]), Route("/heroes", names)]
        ),
        db,
        server_timing=True,
    )
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.post("/heroes/Deadpond")).status_code == 201
            assert (await client.post("/heroes/Rusty-Man")).status_code == 201
            response = await client.get("/heroes")
        assert response.text == "Deadpond,Rusty-Man"
        round_trips = 2 if sync_database_url.startswith("sqlite") else 3  # + BEGIN on PG
        assert f'desc="1 query, {round_trips} round trips"' in response.headers["server-timing"]
        assert db.pool_status().checked_out == 0
    finally:
        db.dispose()


# -- configuration and types --------------------------------------------------------------


def test_the_session_types_are_known_to_the_type_checker(
    sync_database_url: str, tmp_path: Any
) -> None:
    sync = SyncDatabase(sync_database_url)
    async_ = Database(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")

    models = SyncDatabase(sync_database_url, session_class=sqlmodel.Session)

    def read() -> None:  # never called: checked by mypy --strict in `make test`
        assert_type(sync.session, Session)
        assert_type(async_.session, AsyncSession)
        assert_type(sync.engine, Engine)
        assert_type(models.session, sqlmodel.Session)
        assert_type(session_dependency(models), Callable[[], Awaitable[sqlmodel.Session]])
        assert_type(session_dependency(async_), Callable[[], Awaitable[AsyncSession]])

    assert callable(read)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SyncDatabase("sqlite+aiosqlite:///x.db"), "async driver.*use Database"),
        (lambda: SyncDatabase("postgresql+asyncpg://u@h/d"), "async driver"),
        (lambda: Database("sqlite:///x.db"), "synchronous driver.*SyncDatabase"),
        (lambda: Database("postgresql+psycopg2://u@h/d"), "use SyncDatabase"),
        (
            lambda: SyncDatabase("sqlite:///x.db", session_options={"class_": AsyncSession}),
            "an AsyncSession",
        ),
        (lambda: SyncDatabase("sqlite:///x.db", block_event_loop="yes"), "block_event_loop"),  # type: ignore[arg-type]
        (lambda: SyncDatabase("sqlite:///x.db", pool_sise=5), "pool_sise"),
        (lambda: SyncDatabase("sqlite:///x.db", replicas=["sqlite:///y.db"]), "async Database"),
    ],
)
def test_a_wrong_configuration_is_refused_when_the_database_is_made(
    make: Callable[[], object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make()


def test_the_session_class_is_given_once(sync_database_url: str) -> None:
    with pytest.raises(ConfigurationError, match="given twice"):
        SyncDatabase(
            sync_database_url,
            session_class=sqlmodel.Session,
            session_options={"class_": sqlmodel.Session},
        )
    db = SyncDatabase(sync_database_url, session_class=sqlmodel.Session)
    with db.scope() as session:
        assert isinstance(session, sqlmodel.Session)
    db.dispose()


def test_two_phase_commit_is_refused_for_a_sync_database(sync_database_url: str) -> None:
    db = SyncDatabase(sync_database_url)
    with pytest.raises(ConfigurationError, match="two_phase=True is for async databases"):
        SQLAlchemyMiddleware(threaded_app(lambda: None), db, two_phase=True)


async def test_lifespan_starts_and_disposes_the_engine_in_a_worker_thread(
    sync_database_url: str,
) -> None:
    from asgi_lifespan import LifespanManager

    db = SyncDatabase(sync_database_url)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    async with LifespanManager(SQLAlchemyMiddleware(app, db)):
        assert db._engine is not None
        assert db.pool_status().checked_in == 1  # the startup check's connection
    assert db._engine is None


def test_the_loop_check_sees_no_loop_in_a_worker_thread() -> None:
    # Guards the assumption behind the refusal: asyncio's running loop is per thread.
    seen: list[object] = []

    async def main() -> None:
        seen.append(asyncio._get_running_loop())
        await asyncio.to_thread(lambda: seen.append(asyncio._get_running_loop()))

    asyncio.run(main())
    assert seen[0] is not None
    assert seen[1] is None


# -- retries ------------------------------------------------------------------------------

_RAISE_CONFLICT = (
    "CREATE FUNCTION raise_conflict() RETURNS integer LANGUAGE plpgsql AS $$ BEGIN "
    "RAISE EXCEPTION 'a serialization failure' USING ERRCODE = '40001'; END $$"
)


@pytest.fixture
def conflicting_db(sync_postgresql_url: str) -> Iterator[SyncDatabase]:
    """A PostgreSQL ``SyncDatabase`` where ``SELECT raise_conflict()`` fails with 40001."""
    from _helpers import open_sync_database

    database = open_sync_database(sync_postgresql_url)
    with database.engine.begin() as connection:
        connection.execute(text(_RAISE_CONFLICT))
    try:
        yield database
    finally:
        database.dispose()


class RetryRoute:
    """``POST /w``, a retry route, served by a ``def`` handler on ``db``.

    Each run of the handler adds the key ``run-N`` (N counts the runs), then calls
    ``then(N)``; a run that returns answers 201.
    """

    def __init__(self, db: SyncDatabase, then: Callable[[int], None]) -> None:
        self.db = db
        self.then = then
        self.runs = 0
        app = Starlette(routes=[Route("/w", self.handler, methods=["POST"])])
        self.app = SQLAlchemyMiddleware(app, db, retry=["/w"])

    def handler(self, request: Request) -> PlainTextResponse:
        self.runs += 1
        add(self.db, f"run-{self.runs}")
        self.then(self.runs)
        return PlainTextResponse("saved", status_code=201)

    async def call(self) -> ASGIRecorder:
        return await call_http(self.app, "/w", method="POST")


async def test_a_retry_route_reruns_a_def_handler_after_a_serialization_failure(
    conflicting_db: SyncDatabase,
) -> None:
    def conflict_on_the_first_run(run: int) -> None:
        if run == 1:
            conflicting_db.session.execute(text("SELECT raise_conflict()"))

    route = RetryRoute(conflicting_db, then=conflict_on_the_first_run)
    recorder = await route.call()

    assert recorder.status == 201
    assert route.runs == 2
    assert sync_keys(conflicting_db) == {"run-2"}
    assert sync_checked_out(conflicting_db) == 0


async def test_a_retry_route_is_not_rerun_once_the_def_handler_committed(
    conflicting_db: SyncDatabase,
) -> None:
    def commit_then_conflict(run: int) -> None:
        conflicting_db.commit()
        conflicting_db.session.execute(text("SELECT raise_conflict()"))

    route = RetryRoute(conflicting_db, then=commit_then_conflict)
    with pytest.raises(DBAPIError):
        await route.call()

    assert route.runs == 1
    assert sync_keys(conflicting_db) == {"run-1"}
    assert sync_checked_out(conflicting_db) == 0


async def test_threads_asking_for_the_session_at_once_share_one_and_leak_nothing(
    sync_db: SyncDatabase,
) -> None:
    sessions: list[Session] = []
    barrier = threading.Barrier(8)

    def work() -> None:
        def first_read() -> None:
            barrier.wait()
            sessions.append(sync_db.session)

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads as often as possible
        try:
            with ThreadPoolExecutor(8) as pool:
                # A thread pool of the app's own, with the request's context in each thread.
                futures = [pool.submit(copy_context().run, first_read) for _ in range(8)]
                for future in futures:
                    future.result()
        finally:
            sys.setswitchinterval(interval)
        add(sync_db, "k")

    await call_http(SQLAlchemyMiddleware(threaded_app(work), sync_db))

    assert len({id(session) for session in sessions}) == 1
    assert sync_keys(sync_db) == {"k"}
    assert sync_checked_out(sync_db) == 0


async def test_an_object_added_without_a_flush_is_committed(sync_database_url: str) -> None:
    db = SyncDatabase(sync_database_url)
    sqlmodel.SQLModel.metadata.create_all(db.engine, tables=[Sidekick.__table__])  # type: ignore[attr-defined]
    app = SQLAlchemyMiddleware(threaded_app(lambda: db.session.add(Sidekick(name="Tarantula"))), db)
    try:
        assert (await call_http(app)).status == 200
        with db.engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM sidekick")).scalar() == 1
    finally:
        db.dispose()


def test_an_engine_of_the_apps_own_is_used_and_left_to_the_app(sync_database_url: str) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(sync_database_url)
    db = SyncDatabase(engine=engine)
    with db.scope() as session:
        assert session.execute(text("SELECT 1")).scalar() == 1
    db.dispose()
    assert db.engine is engine  # not disposed nor replaced: the app's to dispose
    engine.dispose()


def test_an_engine_factory_is_called_at_first_use_and_its_engine_disposed(
    sync_database_url: str,
) -> None:
    from sqlalchemy import create_engine

    made: list[Engine] = []

    def factory() -> Engine:
        made.append(create_engine(sync_database_url))
        return made[-1]

    db = SyncDatabase(engine=factory)
    assert made == []
    with db.scope() as session:
        session.execute(text("SELECT 1"))
    assert db.engine is made[0]
    db.dispose()
    assert db.engine is made[1]  # a new one after dispose()
    db.dispose()


def test_an_engine_factory_returning_an_async_engine_is_refused(tmp_path: Any) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    def factory() -> Any:  # wrong on purpose: what the type checker would refuse
        return create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/a.db")

    db = SyncDatabase(engine=factory)
    with pytest.raises(ConfigurationError, match="SyncDatabase needs an Engine"):
        db.engine  # noqa: B018


async def test_a_quart_def_view_and_its_def_background_task_each_commit(
    sync_db: SyncDatabase,
) -> None:
    from quart import Quart

    from asgi_sqla.quart import add_background_task, init_app

    app = Quart(__name__)
    threads: dict[str, str] = {}

    def task(key: str) -> None:  # a plain function: Quart runs it in a worker thread
        threads["task"] = threading.current_thread().name
        add(sync_db, key)

    @app.post("/")
    def view() -> tuple[str, int]:  # a plain view: Quart runs it in a worker thread too
        threads["view"] = threading.current_thread().name
        add(sync_db, "view")
        add_background_task(task, "task")
        return "created", 201

    app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, sync_db)  # type: ignore[method-assign]
    init_app(app)

    recorder = await call_http(as_asgi_app(app), "/", method="POST")
    with anyio.fail_after(10):
        await asyncio.gather(*app.background_tasks)

    assert recorder.status == 201
    assert threading.main_thread().name not in threads.values()
    assert sync_keys(sync_db) == {"view", "task"}
    assert sync_checked_out(sync_db) == 0
