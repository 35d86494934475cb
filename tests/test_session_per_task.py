"""``Database(session_per_task=True)``: each child task of a request gets a session of its own.

The first task to read ``db.session`` in a request keeps the usual session; any other
task (``gather``, task groups, ``create_task``) gets one of its own, lazy like it, kept
in the unit of work under a ``TaskSessionKey`` and ended with the request's round by
its outcome.  Each commits separately: not atomic, unless ``two_phase=True`` prepares
them together.  Every test ends with no connection checked out.

SQLite lets one transaction write at a time, and these sessions' transactions last until
the response starts: there, the children read (or take turns writing).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from asgi_sqla import (
    ConfigurationError,
    Database,
    Result,
    RollbackOnlyError,
    SessionContext,
    SessionEndedError,
    SQLAlchemyMiddleware,
    SyncDatabase,
    TaskSessionKey,
)
from asgi_sqla.pytest_plugin import rolled_back
from asgi_sqla.types import Message, Receive, Scope, Send

from _helpers import (
    CANCEL_STYLES,
    ASGIRecorder,
    Cancel,
    add_key,
    call_http,
    cancel_request,
    checked_out,
    http_scope,
    idle_in_transaction,
    items,
    keys,
    open_database,
    orphan_child,
    plain_response,
    websocket_scope,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def db_options() -> dict[str, Any]:
    return {"session_per_task": True}


@pytest.fixture
def admin(request: pytest.FixtureRequest, database_url: str) -> Any:
    """The ``pg_admin`` connection on PostgreSQL, None on SQLite."""
    if database_url.startswith("postgresql"):
        return request.getfixturevalue("pg_admin")
    return None


async def assert_nothing_left_behind(db: Database, admin: Any) -> None:
    assert checked_out(db) == 0
    if admin is not None:
        assert await idle_in_transaction(admin) == []


def sqlite(db: Database) -> bool:
    return db.engine.dialect.name == "sqlite"


class Together:
    """Lets ``count`` tasks go on only once all of them have arrived."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.arrived = 0
        self.all_here = anyio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived == self.count:
            self.all_here.set()
        await self.all_here.wait()


async def hold_a_connection(db: Database, together: Together, key: str) -> None:
    """Take a connection on this task's session, wait for the others, then write ``key``
    (PostgreSQL) or read (SQLite, one writer at a time)."""
    await db.session.execute(text("SELECT 1"))
    await together.wait()  # every child holds its own connection here
    if not sqlite(db):
        await add_key(db, key)


def recording_unit(
    units: list[SessionContext], app: Callable[[Scope, Receive, Send], Awaitable[None]]
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """``app``, keeping its unit of work (for its outcome) in ``units``."""

    async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
        units.append(SessionContext.from_scope(scope))
        await app(scope, receive, send)

    return recorded


# -- concurrent children, each with a session of its own --------------------------------


@pytest.mark.parametrize("status", [201, 400])
async def test_concurrent_children_each_get_a_session_ended_with_the_request_by_its_status(
    db: Database, admin: Any, status: int
) -> None:
    children = 3
    together = Together(children)
    peak: list[int] = []
    units: list[SessionContext] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "request")  # the request's own task: the usual session
        own = db.session
        async with anyio.create_task_group() as group:
            for number in range(children):
                group.start_soon(hold_a_connection, db, together, f"child-{number}")
        peak.append(checked_out(db))
        assert db.session is own
        await plain_response(send, status)

    app_with_unit = recording_unit(units, app)
    with anyio.fail_after(20):
        recorder = await call_http(SQLAlchemyMiddleware(app_with_unit, db))

    assert recorder.status == status
    assert peak == [1 + children]  # each child's connection is held until the end
    committed = status < 400
    expected = {"request"} | (set() if sqlite(db) else {f"child-{n}" for n in range(children)})
    assert await keys(db) == (expected if committed else set())
    [unit] = units
    assert unit.outcome is not None
    results = unit.outcome.results
    assert list(results)[-1] is db  # the request's own session ends last
    task_keys = [key for key in results if isinstance(key, TaskSessionKey)]
    assert len(task_keys) == children
    assert all(key.db is db and repr(db) in repr(key) for key in task_keys)
    result = Result.COMMITTED if committed else Result.ROLLED_BACK
    assert set(results.values()) == {result}
    await assert_nothing_left_behind(db, admin)


async def test_gather_of_children_that_read_at_once_is_not_refused(
    db: Database, admin: Any
) -> None:
    async def count() -> int:
        # Both are inside a statement at once: each on its own session.
        await db.session.execute(text("SELECT 1"))
        return int(await db.session.scalar(select(func.count()).select_from(items)) or 0)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "before")
        counts = await asyncio.gather(count(), count(), count())
        assert list(counts) == [0, 0, 0]  # the request's write is not committed yet
        await plain_response(send, 201)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 201
    assert await keys(db) == {"before"}
    await assert_nothing_left_behind(db, admin)


async def test_a_child_whose_commit_fails_makes_a_500_while_another_child_committed(
    database_url: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Not atomic.  A database's sessions end newest first: the second child's commits,
    # then the first child's COMMIT fails (a deferred foreign key), and the request's
    # own session, last, is rolled back.  The client gets a 500 and the log says the
    # writes are only partly saved.
    db = await open_database(database_url, session_per_task=True, stats=True)
    writes = not sqlite(db)
    units: list[SessionContext] = []

    async def second_child() -> None:
        if writes:
            await add_key(db, "second-child")
        else:  # SQLite: one writer at a time, and the first child's write is open
            await db.session.execute(text("SELECT 1"))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        db.session  # noqa: B018  (the request's task owns the usual session)
        await asyncio.create_task(orphan_child(db))
        await asyncio.create_task(second_child())
        await plain_response(send, 201)

    try:
        with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
            recorder = await call_http(SQLAlchemyMiddleware(recording_unit(units, app), db))

        assert recorder.status == 500
        assert await keys(db) == ({"second-child"} if writes else set())
        errors = [r.getMessage() for r in caplog.records if r.name == "asgi_sqla"]
        assert any("partly saved" in text and "in task" in text for text in errors), errors
        [unit] = units
        assert unit.outcome is not None
        assert list(unit.outcome.results.values()) == [
            Result.COMMITTED_WHILE_ANOTHER_FAILED,
            Result.FAILED,
            Result.ROLLED_BACK,
        ]
        assert list(unit.outcome.results)[-1] is db
        # The database's statistics cover its sessions in every task: the worst result.
        assert unit.all_stats()[db].outcome == "commit failed"
        await assert_nothing_left_behind(db, admin)
    finally:
        await db.dispose()


async def test_under_the_pytest_plugin_the_childrens_sessions_share_the_tests_connection(
    db: Database, admin: Any
) -> None:
    # Each session is a savepoint on the test's connection, opened inside the ones
    # before it: they end newest first, and the outer transaction rolls all back.
    async def child(number: int) -> None:
        await db.session.execute(text("SELECT 1"))
        if not sqlite(db):
            await add_key(db, f"child-{number}")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "request")
        await asyncio.gather(child(1), child(2))
        await plain_response(send, 201)

    async with rolled_back(db, wait_timeout=5):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))
        assert recorder.status == 201

    assert await keys(db) == set()
    await assert_nothing_left_behind(db, admin)


@pytest.mark.postgresql
async def test_with_two_phase_the_sessions_of_the_children_commit_all_or_none(
    postgresql_url: str, pg_admin: Any
) -> None:
    db = await open_database(postgresql_url, session_per_task=True)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "request")
        await asyncio.gather(add_key(db, "child"), orphan_child(db))
        await plain_response(send, 201)

    try:
        recorder = await call_http(SQLAlchemyMiddleware(app, db, two_phase=True))
        assert recorder.status == 500
        assert await keys(db) == set()  # the failed PREPARE rolled back all three
        assert pg_admin.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone()[0] == 0
        assert checked_out(db) == 0
    finally:
        await db.dispose()


# -- the explicit controls act on the calling task's session -------------------------------


async def test_commit_rollback_release_and_callbacks_in_a_child_act_on_its_own_session(
    db: Database, admin: Any
) -> None:
    ran: list[str] = []
    held: list[int] = []

    async def child() -> None:
        await add_key(db, "child-committed")
        db.before_commit(lambda session: ran.append("child before_commit"))
        db.on_commit(lambda: ran.append("child on_commit"))
        await db.commit()
        await add_key(db, "child-rolled-back")
        db.on_commit(lambda: ran.append("never"))
        await db.rollback()
        await add_key(db, "child-released")
        await db.release()
        held.append(checked_out(db))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        db.session  # noqa: B018  (the request's task owns the usual session)
        await asyncio.create_task(child())
        await add_key(db, "request")  # after the child: SQLite has one writer at a time
        db.on_commit(lambda: ran.append("request on_commit"))
        await plain_response(send, 409)  # the request's own session rolls back

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 409
    assert ran == ["child before_commit", "child on_commit"]
    assert held == [0]  # the child released its connection; the request had none yet
    assert await keys(db) == {"child-committed", "child-released"}
    await assert_nothing_left_behind(db, admin)


async def test_set_rollback_only_in_a_child_marks_only_the_childs_session(
    db: Database, admin: Any
) -> None:
    async def child() -> None:
        db.set_rollback_only()
        await db.session.execute(text("SELECT 1"))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        db.session  # noqa: B018  (the request's task owns the usual session)
        await asyncio.create_task(child())
        await add_key(db, "request")
        await plain_response(send, 201)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 201
    assert await keys(db) == {"request"}
    await assert_nothing_left_behind(db, admin)


async def test_a_read_only_route_makes_every_childs_session_read_only(
    db: Database, admin: Any
) -> None:
    refused: list[type[BaseException]] = []

    async def child() -> None:
        try:
            await add_key(db, "child")  # PostgreSQL: READ ONLY refuses the write
            await db.commit()  # elsewhere, the commit is refused
        except (DBAPIError, RollbackOnlyError) as exc:
            refused.append(type(exc))
            await db.rollback()  # SQLite: lets the other child write

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.session.execute(text("SELECT 1"))
        await asyncio.gather(child(), child())
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db, read_only=["/*"]))

    assert recorder.status == 200
    expected = RollbackOnlyError if sqlite(db) else DBAPIError
    assert [issubclass(kind, expected) for kind in refused] == [True, True]
    assert await keys(db) == set()
    await assert_nothing_left_behind(db, admin)


# -- children outliving the moment their session ends --------------------------------------


async def test_a_child_still_running_at_response_start_has_its_session_ended_under_it(
    db: Database, admin: Any
) -> None:
    # As for the request's own session: the start commits the child's session (the
    # child is between two statements), a later call on it raises SessionEndedError,
    # and the child's next read of db.session opens a session ended with the request.
    started = anyio.Event()
    wrote = anyio.Event()
    seen: list[BaseException] = []

    async def child() -> None:
        session = db.session
        await session.execute(items.insert().values(key="before-start"))
        wrote.set()
        await started.wait()
        try:
            await session.execute(text("SELECT 1"))
        except SessionEndedError as exc:
            seen.append(exc)
        await add_key(db, "after-start")  # a new session, of the work after the start

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.create_task(child())
        await wrote.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        started.set()
        await task
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    with anyio.fail_after(20):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert len(seen) == 1
    assert "response started" in str(seen[0])
    assert await keys(db) == {"before-start", "after-start"}
    await assert_nothing_left_behind(db, admin)


@pytest.mark.postgresql
async def test_a_child_inside_a_statement_at_response_start_is_waited_for_then_committed(
    postgresql_url: str, pg_admin: Any
) -> None:
    db = await open_database(postgresql_url, session_per_task=True)
    seen: list[BaseException] = []
    pool_at_start: list[int] = []

    async def child() -> None:
        session = db.session
        await session.execute(items.insert().values(key="child"))
        await session.execute(text("SELECT pg_sleep(0.3)"))
        try:
            await session.execute(text("SELECT 1"))
        except SessionEndedError as exc:
            seen.append(exc)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.create_task(child())
        deadline = anyio.current_time() + 5
        while not any("pg_sleep" in q for _, s, q in _active(pg_admin)):
            assert anyio.current_time() < deadline, "the child's statement never started"
            await anyio.sleep(0.005)  # polling the server, bounded by the deadline
        await plain_response(send, 201)
        await task

    def on_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            pool_at_start.append(checked_out(db))

    try:
        with anyio.fail_after(20):
            recorder = await call_http(SQLAlchemyMiddleware(app, db), on_send=on_send)
        assert recorder.status == 201
        assert pool_at_start == [0]  # the statement finished, then the COMMIT
        assert await keys(db) == {"child"}
        assert len(seen) == 1
        await assert_nothing_left_behind(db, pg_admin)
    finally:
        await db.dispose()


def _active(admin: Any) -> list[tuple[int, str, str]]:
    return list(
        admin.execute(
            "SELECT pid, state, query FROM pg_stat_activity WHERE state = 'active' "
            "AND pid <> pg_backend_pid() AND datname = current_database()"
        )
    )


async def test_a_task_reading_db_session_after_the_request_ended_gets_session_ended_error(
    db: Database, admin: Any
) -> None:
    go = anyio.Event()
    seen: list[BaseException] = []
    tasks: list[asyncio.Task[None]] = []

    async def late() -> None:
        await go.wait()
        try:
            db.session  # noqa: B018
        except SessionEndedError as exc:
            seen.append(exc)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "request")
        tasks.append(asyncio.create_task(late()))  # outlives the request
        await plain_response(send, 201)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))
    go.set()
    await tasks[0]

    assert recorder.status == 201
    assert len(seen) == 1
    assert "request has finished" in str(seen[0])
    await assert_nothing_left_behind(db, admin)


async def test_a_finished_child_task_is_not_kept_alive_by_its_session(
    db: Database, admin: Any
) -> None:
    freed: list[bool] = []

    async def child() -> None:
        await db.session.execute(text("SELECT 1"))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        db.session  # noqa: B018  (the request's task owns the usual session)
        task = asyncio.create_task(child())
        await task
        finished = weakref.ref(task)
        del task
        # The loop's wake-up handles refer to a task for an iteration or two after it
        # finished: let them run, with a deadline.
        deadline = anyio.current_time() + 2
        while finished() is not None and anyio.current_time() < deadline:
            await asyncio.sleep(0)
            gc.collect()
        freed.append(finished() is None)  # its session is still open, in the unit
        await plain_response(send, 201)

    units: list[SessionContext] = []
    recorder = await call_http(SQLAlchemyMiddleware(recording_unit(units, app), db))

    assert recorder.status == 201
    assert freed == [True]
    [unit] = units
    assert unit.outcome is not None
    [child_key] = [key for key in unit.outcome.results if isinstance(key, TaskSessionKey)]
    assert unit.outcome.results[child_key] is Result.COMMITTED  # ended with the request
    await assert_nothing_left_behind(db, admin)


async def test_a_new_task_never_gets_the_session_of_a_finished_one(db: Database) -> None:
    sessions: list[object] = []
    addresses: list[int] = []

    async def child() -> None:
        addresses.append(id(asyncio.current_task()))
        sessions.append(db.session)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        db.session  # noqa: B018  (the request's task owns the usual session)
        for _ in range(20):
            await asyncio.create_task(child())
            for _ in range(3):  # the loop's wake-up handles let go of the finished task
                await asyncio.sleep(0)
        await plain_response(send, 201)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert len(set(addresses)) < 20  # a new task was made where a freed one had been
    assert len({id(session) for session in sessions}) == 20


# -- many children, a small pool -----------------------------------------------------------


@pytest.fixture
async def small_pool_db(database_url: str) -> AsyncIterator[Database]:
    database = await open_database(
        database_url, session_per_task=True, pool_size=5, max_overflow=0, pool_timeout=10
    )
    try:
        yield database
    finally:
        await database.dispose()


async def test_200_children_that_release_queue_on_a_pool_of_5(
    small_pool_db: Database, admin: Any
) -> None:
    db = small_pool_db
    peak = 0
    writes = not sqlite(db)

    async def child(number: int) -> None:
        nonlocal peak
        if writes:
            await add_key(db, f"child-{number}")
        else:
            await db.session.execute(text("SELECT 1"))
        peak = max(peak, checked_out(db))
        await db.release()  # commits this child's work and gives its connection back

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.gather(*(child(number) for number in range(200)))
        await plain_response(send, 201)

    with anyio.fail_after(30):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 201
    assert peak == 5
    assert len(await keys(db)) == (200 if writes else 0)
    await assert_nothing_left_behind(db, admin)


async def test_200_children_holding_their_connections_on_a_pool_of_5_get_a_503_and_leak_nothing(
    database_url: str, admin: Any
) -> None:
    # Each child's session keeps its connection until the request ends: the sixth
    # child waits for the pool, and times out.
    db = await open_database(
        database_url, session_per_task=True, pool_size=5, max_overflow=0, pool_timeout=0.2
    )
    writes = not sqlite(db)

    async def child(number: int) -> None:
        if writes:
            await add_key(db, f"child-{number}")
        else:
            await db.session.execute(text("SELECT 1"))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.gather(*(child(number) for number in range(200)))
        await plain_response(send, 201)

    try:
        with anyio.fail_after(30):
            recorder = await call_http(SQLAlchemyMiddleware(app, db))
        assert recorder.status == 503
        assert await keys(db) == set()
        await assert_nothing_left_behind(db, admin)
    finally:
        await db.dispose()


# -- cancellation, websockets --------------------------------------------------------------


@pytest.mark.parametrize("style", CANCEL_STYLES)
async def test_a_request_cancelled_while_children_hold_connections_leaks_nothing(
    db: Database, admin: Any, style: str
) -> None:
    together = Together(4)  # three children and the trigger
    forever = anyio.Event()

    async def child(key: str) -> None:
        await hold_a_connection(db, together, key)
        await forever.wait()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "request")
        async with anyio.create_task_group() as group:
            for number in range(3):
                group.start_soon(child, f"child-{number}")
        await plain_response(send, 201)

    async def request() -> None:
        await ASGIRecorder()(SQLAlchemyMiddleware(app, db), http_scope())

    async def trigger(cancel: Cancel) -> None:
        await together.wait()
        assert checked_out(db) == 4
        cancel()

    await cancel_request(style, request, trigger)

    assert await keys(db) == set()
    await assert_nothing_left_behind(db, admin)


async def test_a_websocket_ends_the_childrens_sessions_at_each_receive(
    db: Database, admin: Any
) -> None:
    seen_after_receive: list[set[str]] = []
    units: list[SessionContext] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        units.append(SessionContext.from_scope(scope))
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        for round_number in (1, 2):
            await asyncio.create_task(add_key(db, f"child-round-{round_number}"))
            await receive()  # ends the round: the child's session commits
            seen_after_receive.append(await keys(db))
        await send({"type": "websocket.close", "code": 1000})

    recorder = ASGIRecorder(
        [
            {"type": "websocket.connect"},
            {"type": "websocket.receive", "text": "one"},
            {"type": "websocket.receive", "text": "two"},
        ]
    )
    with anyio.fail_after(20):
        await recorder(SQLAlchemyMiddleware(app, db), websocket_scope())

    assert seen_after_receive == [
        {"child-round-1"},
        {"child-round-1", "child-round-2"},
    ]
    [unit] = units
    assert unit.outcome is not None
    assert [type(key) for key in unit.outcome.results] == [TaskSessionKey]
    await assert_nothing_left_behind(db, admin)


# -- configuration ----------------------------------------------------------------------------


async def test_the_option_is_off_by_default_and_checked(database_url: str) -> None:
    with pytest.raises(ConfigurationError, match="session_per_task"):
        Database(database_url, session_per_task="yes")  # type: ignore[arg-type]


def test_a_sync_database_refuses_the_option(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match="new_session"):
        SyncDatabase(f"sqlite:///{tmp_path / 'db.sqlite'}", session_per_task=True)


async def test_a_child_reads_through_its_own_session_when_the_database_has_replicas(
    tmp_path: Any,
) -> None:
    # db.read_session in a child is the child's own session (on the primary): the
    # replica's session is the owner task's, and one session serves one task at a time.
    url = f"sqlite+aiosqlite:///{tmp_path / 'primary.db'}"
    db = Database(url, session_per_task=True, replicas=[url])
    sessions: dict[str, object] = {}

    async def child() -> None:
        sessions["child read"] = db.read_session
        sessions["child"] = db.session

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sessions["owner read"] = db.read_session
        sessions["owner"] = db.session
        await asyncio.create_task(child())
        await plain_response(send, 200)

    try:
        await call_http(SQLAlchemyMiddleware(app, db))
    finally:
        await db.dispose()

    assert sessions["child read"] is sessions["child"]
    assert sessions["owner read"] is not sessions["owner"]
    assert sessions["child"] is not sessions["owner"]
