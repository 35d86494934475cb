"""``db.before_commit(callback)``: work inside the transaction, just before its COMMIT.

The callback gets the synchronous ``Session`` and may still query (the guard lets its
statements through: they run in the commit's greenlet, or thread).  It runs however the
transaction is committed, after pending ORM changes are flushed, never when it rolls
back; an exception in it fails the commit: the transaction rolls back, the client gets a
500, and the on_commit callbacks never run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Session

from asgi_sqla import ConfigurationError, Database, SQLAlchemyMiddleware, SyncDatabase
from asgi_sqla.types import Receive, Scope, Send

from _helpers import (
    add_key,
    call_http,
    checked_out,
    items,
    keys,
    open_database,
    plain_response,
    sync_checked_out,
    sync_keys,
)

pytestmark = pytest.mark.anyio


class Base(DeclarativeBase):
    pass


class Item(Base):
    """``items`` as an ORM class, to leave a write pending (unflushed) until the commit."""

    __table__ = items


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await open_database(database_url)
    try:
        yield database
    finally:
        await database.dispose()


def count_in(session: Session) -> int:
    """Rows of ``items`` seen by ``session``'s transaction.

    On the session's connection, which does not autoflush (``session.execute()`` does):
    it sees pending ORM changes only because they were flushed before the hooks ran.
    """
    return int(session.connection().exec_driver_sql("SELECT count(*) FROM items").scalar_one())


class Steps:
    """Records, in order, the hooks, the engine's COMMITs and the on_commit callbacks."""

    def __init__(self, engine: Any) -> None:
        self.steps: list[str] = []
        event.listen(engine, "commit", lambda connection: self.steps.append("COMMIT"))

    def hook(self, name: str) -> Callable[[Session], None]:
        def before_commit(session: Session) -> None:
            self.steps.append(f"{name} saw {count_in(session)}")

        return before_commit

    def after(self, name: str) -> Callable[[], None]:
        return lambda: self.steps.append(name)


def app_that(
    work: Callable[[], Awaitable[object]], status: int = 201
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await work()
        await plain_response(send, status)

    return app


# -- when it runs ------------------------------------------------------------------------


async def test_the_hooks_run_in_order_inside_the_transaction_then_commit_then_on_commit(
    db: Database,
) -> None:
    steps = Steps(db.engine.sync_engine)

    async def work() -> None:
        db.session.add(Item(key="pending"))  # flushed before the hooks run
        db.before_commit(steps.hook("first"))
        db.before_commit(steps.hook("second"))
        db.on_commit(steps.after("on_commit"))

    recorder = await call_http(SQLAlchemyMiddleware(app_that(work), db))

    assert recorder.status == 201
    assert steps.steps == ["first saw 1", "second saw 1", "COMMIT", "on_commit"]
    assert await keys(db) == {"pending"}
    assert checked_out(db) == 0


async def test_a_hook_that_writes_commits_its_row_with_the_transaction(db: Database) -> None:
    def audit(session: Session) -> None:
        session.execute(items.insert().values(key=f"audit-{count_in(session)}"))

    async def work() -> None:
        await add_key(db, "order")
        db.before_commit(audit)

    recorder = await call_http(SQLAlchemyMiddleware(app_that(work), db))

    assert recorder.status == 201
    assert await keys(db) == {"order", "audit-1"}


@pytest.mark.parametrize("status", [400, 500])
async def test_a_transaction_that_rolls_back_never_runs_its_hooks(
    db: Database, status: int
) -> None:
    steps = Steps(db.engine.sync_engine)

    async def work() -> None:
        await add_key(db, "rolled-back")
        db.before_commit(steps.hook("hook"))

    recorder = await call_http(SQLAlchemyMiddleware(app_that(work, status), db))

    assert recorder.status == status
    assert steps.steps == []
    assert await keys(db) == set()


async def test_an_explicit_rollback_drops_the_hooks_of_its_transaction(db: Database) -> None:
    steps = Steps(db.engine.sync_engine)

    async def work() -> None:
        await add_key(db, "dropped")
        db.before_commit(steps.hook("dropped"))
        await db.rollback()
        await add_key(db, "kept")
        db.before_commit(steps.hook("kept"))

    recorder = await call_http(SQLAlchemyMiddleware(app_that(work), db))

    assert recorder.status == 201
    assert steps.steps == ["kept saw 1", "COMMIT"]
    assert await keys(db) == {"kept"}


async def commit_with_db_commit(db: Database) -> None:
    await db.commit()


async def commit_with_release(db: Database) -> None:
    await db.release()


async def commit_with_session_commit(db: Database) -> None:
    await db.session.commit()


async def commit_with_run_sync(db: Database) -> None:
    await db.session.run_sync(lambda session: session.commit())


HOW_TO_COMMIT: dict[str, Callable[[Database], Awaitable[None]]] = {
    "db.commit()": commit_with_db_commit,
    "db.release()": commit_with_release,
    "session.commit()": commit_with_session_commit,
    "run_sync(commit)": commit_with_run_sync,
}


@pytest.mark.parametrize("how", HOW_TO_COMMIT)
async def test_an_explicit_commit_runs_the_hooks_once_inside_its_transaction(
    db: Database, how: str
) -> None:
    steps = Steps(db.engine.sync_engine)

    async def work() -> None:
        await add_key(db, "explicit")
        db.before_commit(steps.hook("hook"))
        await HOW_TO_COMMIT[how](db)
        steps.steps.append("returned")

    # A 400 rolls back what is left: only the explicit commit commits.
    recorder = await call_http(SQLAlchemyMiddleware(app_that(work, 400), db))

    assert recorder.status == 400
    assert steps.steps == ["hook saw 1", "COMMIT", "returned"]
    assert await keys(db) == {"explicit"}


async def test_the_end_of_a_begin_block_runs_the_hooks_registered_inside_it(
    db: Database,
) -> None:
    steps = Steps(db.engine.sync_engine)

    async def work() -> None:
        async with db.session.begin():
            await add_key(db, "block")
            db.before_commit(steps.hook("hook"))
        steps.steps.append("block ended")

    recorder = await call_http(SQLAlchemyMiddleware(app_that(work, 400), db))

    assert recorder.status == 400
    assert steps.steps == ["hook saw 1", "COMMIT", "block ended"]
    assert await keys(db) == {"block"}


async def test_a_begin_block_that_raises_drops_the_hooks_registered_inside_it(
    db: Database,
) -> None:
    steps = Steps(db.engine.sync_engine)

    async def failing_block() -> None:
        async with db.session.begin():
            await add_key(db, "dropped")
            db.before_commit(steps.hook("dropped"))
            raise LookupError("the block fails")

    async def work() -> None:
        with pytest.raises(LookupError):
            await failing_block()
        await add_key(db, "kept")

    recorder = await call_http(SQLAlchemyMiddleware(app_that(work), db))

    assert recorder.status == 201
    assert steps.steps == ["COMMIT"]
    assert await keys(db) == {"kept"}


async def test_a_scope_runs_the_hooks_when_it_exits(db: Database) -> None:
    steps = Steps(db.engine.sync_engine)

    async with db.scope():
        await add_key(db, "scoped")
        db.before_commit(steps.hook("hook"))

    assert steps.steps == ["hook saw 1", "COMMIT"]
    assert await keys(db) == {"scoped"}


async def test_releasing_a_savepoint_runs_no_hook_and_the_commit_runs_each_once(
    db: Database,
) -> None:
    steps = Steps(db.engine.sync_engine)

    async def work() -> None:
        db.before_commit(steps.hook("hook"))
        async with db.session.begin_nested():
            await add_key(db, "in-savepoint")
        steps.steps.append("savepoint released")

    recorder = await call_http(SQLAlchemyMiddleware(app_that(work), db))

    assert recorder.status == 201
    assert steps.steps == ["savepoint released", "hook saw 1", "COMMIT"]


async def test_a_begin_block_committing_over_a_savepoint_left_open_runs_the_hook_once(
    db: Database,
) -> None:
    # SQLAlchemy announces that commit while the savepoint is still current, then the
    # savepoint's release: the hook must run once, neither never nor twice.
    steps = Steps(db.engine.sync_engine)

    async def work() -> None:
        async with db.session.begin():
            await db.session.begin_nested()  # never closed: the commit releases it
            await add_key(db, "under-savepoint")
            db.before_commit(steps.hook("hook"))

    recorder = await call_http(SQLAlchemyMiddleware(app_that(work, 400), db))

    assert recorder.status == 400
    assert steps.steps == ["hook saw 1", "COMMIT"]
    assert await keys(db) == {"under-savepoint"}


# -- when it fails -----------------------------------------------------------------------


def failing_hook(session: Session) -> None:
    count_in(session)  # it may query first
    raise LookupError("no such replica")


async def test_a_hook_that_raises_answers_500_commits_nothing_and_skips_on_commit(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    steps = Steps(db.engine.sync_engine)

    async def work() -> None:
        await add_key(db, "doomed")
        db.before_commit(failing_hook)
        db.on_commit(steps.after("on_commit"))

    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        recorder = await call_http(SQLAlchemyMiddleware(app_that(work), db))

    assert recorder.status == 500
    assert steps.steps == []  # no COMMIT, no on_commit
    assert await keys(db) == set()
    assert checked_out(db) == 0
    [record] = [r for r in caplog.records if r.name == "asgi_sqla"]
    assert "failed to commit" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], LookupError)


async def test_a_hook_that_raises_in_an_explicit_commit_rolls_that_transaction_back(
    db: Database,
) -> None:
    raised: list[BaseException] = []

    async def work() -> None:
        await add_key(db, "doomed")
        db.before_commit(failing_hook)
        try:
            await db.commit()
        except LookupError as exc:
            raised.append(exc)
        # The transaction was rolled back; the session goes on with a new one.
        await add_key(db, "after")

    recorder = await call_http(SQLAlchemyMiddleware(app_that(work), db))

    assert recorder.status == 201
    assert len(raised) == 1
    assert await keys(db) == {"after"}
    assert checked_out(db) == 0


async def test_a_hook_that_raises_at_the_end_of_a_begin_block_rolls_it_back(
    db: Database,
) -> None:
    async def block_with_a_failing_hook() -> None:
        async with db.session.begin():
            await add_key(db, "doomed")
            db.before_commit(failing_hook)

    async def work() -> None:
        with pytest.raises(LookupError):
            await block_with_a_failing_hook()
        await add_key(db, "after")

    recorder = await call_http(SQLAlchemyMiddleware(app_that(work), db))

    assert recorder.status == 201
    assert await keys(db) == {"after"}


@pytest.mark.postgresql
async def test_a_hook_that_swallows_a_failed_statement_on_postgresql_answers_500(
    postgresql_url: str,
) -> None:
    # PostgreSQL aborts the transaction at the failed statement and would answer its
    # COMMIT with a silent ROLLBACK: the 201 would claim a write that was lost.
    db = await open_database(postgresql_url)

    def swallowing(session: Session) -> None:
        with contextlib.suppress(DBAPIError):
            session.execute(text("SELECT no_such_column FROM items"))

    async def work() -> None:
        await add_key(db, "lost")
        db.before_commit(swallowing)

    try:
        recorder = await call_http(SQLAlchemyMiddleware(app_that(work), db))
        assert recorder.status == 500
        assert await keys(db) == set()
        assert checked_out(db) == 0
    finally:
        await db.dispose()


async def test_a_coroutine_function_is_refused_when_registered(db: Database) -> None:
    async def read_lsn(session: Session) -> None:
        raise AssertionError("never called")

    async with db.scope():
        with pytest.raises(ConfigurationError, match="synchronous"):
            db.before_commit(read_lsn)
        with pytest.raises(ConfigurationError, match="takes a function"):
            db.before_commit("not a function")  # type: ignore[arg-type]


async def test_a_hook_returning_an_awaitable_fails_the_commit(db: Database) -> None:
    async def later() -> None:
        raise AssertionError("never awaited")

    async def work() -> None:
        await add_key(db, "doomed")
        db.before_commit(lambda session: later())

    recorder = await call_http(SQLAlchemyMiddleware(app_that(work), db))

    assert recorder.status == 500
    assert await keys(db) == set()


# -- the use case: the WAL position for read-your-writes on a replica ------------------


@pytest.mark.postgresql
async def test_a_hook_reads_the_wal_position_of_the_transactions_writes(
    postgresql_url: str, pg_admin: Any
) -> None:
    db = await open_database(postgresql_url)
    positions: list[str] = []

    def remember_wal_position(session: Session) -> None:
        positions.append(
            session.execute(text("SELECT pg_current_wal_insert_lsn()::text")).scalar_one()
        )

    def server_position() -> str:
        row = pg_admin.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        return str(row[0])

    def before(a: str, b: str) -> bool:
        row = pg_admin.execute("SELECT %s::pg_lsn < %s::pg_lsn", (a, b)).fetchone()
        return bool(row[0])

    async def work() -> None:
        await add_key(db, "replicated")
        db.before_commit(remember_wal_position)

    try:
        start = server_position()
        recorder = await call_http(SQLAlchemyMiddleware(app_that(work), db))
        after_commit = server_position()
    finally:
        await db.dispose()

    assert recorder.status == 201
    [inside] = positions
    # Read after the INSERT (which moved it on) and before the COMMIT record, which
    # comes after it: a lower bound of what a standby must replay to show the row.
    assert before(start, inside)
    assert before(inside, after_commit)


# -- SyncDatabase --------------------------------------------------------------------------


def sync_add(db: SyncDatabase, key: str) -> None:
    db.session.execute(items.insert().values(key=key))


def threaded(
    work: Callable[[], object], status: int = 201
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(work)
        await plain_response(send, status)

    return app


async def test_sync_hooks_run_in_order_inside_the_transaction_then_commit_then_on_commit(
    sync_db: SyncDatabase,
) -> None:
    steps = Steps(sync_db.engine)

    def work() -> None:
        sync_add(sync_db, "sync")
        sync_db.before_commit(steps.hook("first"))
        sync_db.before_commit(steps.hook("second"))
        sync_db.on_commit(steps.after("on_commit"))

    recorder = await call_http(SQLAlchemyMiddleware(threaded(work), sync_db))

    assert recorder.status == 201
    assert steps.steps == ["first saw 1", "second saw 1", "COMMIT", "on_commit"]
    assert sync_keys(sync_db) == {"sync"}
    assert sync_checked_out(sync_db) == 0


async def test_a_sync_hook_that_raises_answers_500_and_commits_nothing(
    sync_db: SyncDatabase,
) -> None:
    steps = Steps(sync_db.engine)

    def work() -> None:
        sync_add(sync_db, "doomed")
        sync_db.before_commit(failing_hook)
        sync_db.on_commit(steps.after("on_commit"))

    recorder = await call_http(SQLAlchemyMiddleware(threaded(work), sync_db))

    assert recorder.status == 500
    assert steps.steps == []
    assert sync_keys(sync_db) == set()
    assert sync_checked_out(sync_db) == 0


async def test_sync_explicit_commit_runs_the_hooks_and_a_rollback_drops_them(
    sync_db: SyncDatabase,
) -> None:
    steps = Steps(sync_db.engine)

    def work() -> None:
        sync_add(sync_db, "committed")
        sync_db.before_commit(steps.hook("committed"))
        sync_db.commit()
        sync_add(sync_db, "rolled-back")
        sync_db.before_commit(steps.hook("dropped"))
        sync_db.rollback()
        sync_add(sync_db, "failed")
        sync_db.before_commit(failing_hook)
        with pytest.raises(LookupError):
            sync_db.commit()

    recorder = await call_http(SQLAlchemyMiddleware(threaded(work, 400), sync_db))

    assert recorder.status == 400
    assert steps.steps == ["committed saw 1", "COMMIT"]
    assert sync_keys(sync_db) == {"committed"}
    assert sync_checked_out(sync_db) == 0


async def test_a_sync_hook_registered_before_any_statement_still_runs_and_commits(
    sync_db: SyncDatabase,
) -> None:
    # The session has no transaction yet: its end must not just close it.
    def audit(session: Session) -> None:
        session.execute(items.insert().values(key="audit"))

    recorder = await call_http(
        SQLAlchemyMiddleware(threaded(lambda: sync_db.before_commit(audit)), sync_db)
    )

    assert recorder.status == 201
    assert sync_keys(sync_db) == {"audit"}
    assert sync_checked_out(sync_db) == 0


async def test_sync_before_commit_refuses_a_coroutine_function(sync_db: SyncDatabase) -> None:
    async def hook(session: Session) -> None:
        raise AssertionError("never called")

    def work() -> None:
        with pytest.raises(ConfigurationError, match="synchronous"):
            sync_db.before_commit(hook)

    recorder = await call_http(SQLAlchemyMiddleware(threaded(work), sync_db))

    assert recorder.status == 201
