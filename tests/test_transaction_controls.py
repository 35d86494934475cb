"""``db.on_commit(callback)`` and ``db.set_rollback_only()``.

An on_commit callback runs once its transaction has committed (the data is durable
when it runs), never when it rolls back or fails to commit, however the transaction
ends.  A rollback-only transaction never commits.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from asgi_sqla import (
    Database,
    NoSessionContextError,
    RollbackOnlyError,
    SQLAlchemyMiddleware,
    read_only,
)
from asgi_sqla.types import Receive, Scope, Send

from _helpers import (
    add_key,
    call_http,
    checked_out,
    keys,
    open_database,
    orphan_child,
    plain_response,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await open_database(database_url)
    try:
        yield database
    finally:
        await database.dispose()


class Calls:
    """Records callback runs, with the keys committed at the moment each ran."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.runs: list[tuple[str, set[str]]] = []

    def sync(self, name: str) -> Callable[[], None]:
        def callback() -> None:
            self.runs.append((name, set()))

        return callback

    def durable(self, name: str) -> Callable[[], object]:
        async def callback() -> None:
            self.runs.append((name, await keys(self.db)))

        return callback

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.runs]


async def test_a_callback_runs_after_a_2xx_commit_and_sees_the_data_durable(db: Database) -> None:
    calls = Calls(db)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "written")
        db.on_commit(calls.durable("async"))
        db.on_commit(calls.sync("sync"))
        assert calls.runs == []
        await plain_response(send, 201)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 201
    assert calls.runs == [("async", {"written"}), ("sync", set())]
    assert checked_out(db) == 0


@pytest.mark.parametrize("status", [400, 404, 500])
async def test_a_callback_never_runs_when_the_request_rolls_back(db: Database, status: int) -> None:
    calls = Calls(db)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "written")
        db.on_commit(calls.sync("never"))
        await plain_response(send, status)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert calls.runs == []
    assert await keys(db) == set()


async def test_a_callback_never_runs_when_the_app_raises(db: Database) -> None:
    calls = Calls(db)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        db.on_commit(calls.sync("never"))
        raise LookupError("boom")

    with pytest.raises(LookupError):
        await call_http(SQLAlchemyMiddleware(app, db))

    assert calls.runs == []


async def test_a_callback_never_runs_when_the_commit_fails(db: Database) -> None:
    calls = Calls(db)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await orphan_child(db)
        db.on_commit(calls.sync("never"))
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 500
    assert calls.runs == []
    assert checked_out(db) == 0


async def test_an_explicit_commit_runs_the_callbacks_registered_before_it(db: Database) -> None:
    calls = Calls(db)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "first")
        db.on_commit(calls.durable("first"))
        await db.commit()
        assert calls.names == ["first"]
        await add_key(db, "second")
        db.on_commit(calls.durable("second"))
        await plain_response(send, 400)  # rolls the second transaction back

    await call_http(SQLAlchemyMiddleware(app, db))

    assert calls.runs == [("first", {"first"})]
    assert await keys(db) == {"first"}


async def test_a_begin_block_that_committed_runs_its_callbacks_even_if_the_request_fails(
    db: Database,
) -> None:
    calls = Calls(db)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with db.session.begin():
            await add_key(db, "in the block")
            db.on_commit(calls.sync("block"))
        await plain_response(send, 400)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert calls.names == ["block"]
    assert await keys(db) == {"in the block"}


async def test_releasing_a_savepoint_is_not_a_commit(db: Database) -> None:
    calls = Calls(db)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "outer")
        async with db.session.begin_nested():
            await add_key(db, "savepoint")
            db.on_commit(calls.sync("after savepoint"))
        assert calls.runs == []
        await plain_response(send, 409)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert calls.runs == []
    assert await keys(db) == set()


async def test_release_commits_and_runs_the_callbacks(db: Database) -> None:
    calls = Calls(db)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "released")
        db.on_commit(calls.durable("release"))
        await db.release()
        assert calls.runs == [("release", {"released"})]
        await plain_response(send, 500)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert await keys(db) == {"released"}


async def test_a_failing_callback_is_logged_and_changes_nothing_else(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    calls = Calls(db)

    def broken() -> None:
        raise RuntimeError("callback failed")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "written")
        db.on_commit(broken)
        db.on_commit(calls.sync("after the broken one"))
        await plain_response(send, 200, b"fine")

    with caplog.at_level(logging.ERROR, logger="asgi_sqla"):
        recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert (recorder.status, recorder.body) == (200, b"fine")
    assert calls.names == ["after the broken one"]
    [record] = [r for r in caplog.records if r.name == "asgi_sqla"]
    assert "on_commit" in record.getMessage()
    assert record.exc_info is not None
    assert await keys(db) == {"written"}


async def test_callbacks_work_in_a_scope(db: Database) -> None:
    calls = Calls(db)

    async with db.scope():
        await add_key(db, "scoped")
        db.on_commit(calls.durable("scope"))

    assert calls.runs == [("scope", {"scoped"})]

    async def failing_scope() -> None:
        async with db.scope():
            db.on_commit(calls.sync("never"))
            raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        await failing_scope()

    assert calls.names == ["scope"]


def test_on_commit_outside_any_context_says_how_to_get_one() -> None:
    db = Database("sqlite+aiosqlite://")
    with pytest.raises(NoSessionContextError, match=r"db\.scope\(\)"):
        db.on_commit(lambda: None)


async def test_a_rollback_only_transaction_rolls_back_a_2xx(db: Database) -> None:
    calls = Calls(db)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "doomed")
        db.on_commit(calls.sync("never"))
        db.set_rollback_only()
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert await keys(db) == set()
    assert calls.runs == []
    assert checked_out(db) == 0


async def test_an_explicit_commit_of_a_rollback_only_transaction_raises(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "doomed")
        db.set_rollback_only()
        with pytest.raises(RollbackOnlyError, match="set_rollback_only"):
            await db.commit()
        await plain_response(send, 200)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert await keys(db) == set()


async def test_the_rollback_only_mark_ends_with_the_session(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "doomed")
        db.set_rollback_only()
        await db.release()  # rolls back: the transaction was marked
        await add_key(db, "fresh")
        await plain_response(send, 200)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert await keys(db) == {"fresh"}


async def test_rollback_only_without_a_statement_takes_no_connection(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        db.set_rollback_only()
        assert checked_out(db) == 0
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert await keys(db) == set()
    async with db.scope() as session:
        assert (await session.execute(text("SELECT 1"))).scalar() == 1


# -- no way of committing walks around the mark --------------------------------------------


async def test_begin_after_set_rollback_only_raises_and_commits_nothing(db: Database) -> None:
    pool_in_app: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        db.set_rollback_only()
        with pytest.raises(RollbackOnlyError, match="set_rollback_only"):
            async with db.session.begin():
                await add_key(db, "doomed")
        # The block's transaction was rolled back and its connection given back.
        assert not db.session.in_transaction()
        pool_in_app.append(checked_out(db))
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert pool_in_app == [0]
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_commit_through_run_sync_after_set_rollback_only_raises(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "doomed")
        db.set_rollback_only()
        with pytest.raises(RollbackOnlyError):
            await db.session.run_sync(lambda session: session.commit())
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_a_rollback_only_transaction_may_release_savepoints(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        db.set_rollback_only()
        await add_key(db, "outer")
        async with db.session.begin_nested():
            await add_key(db, "savepoint")
        with pytest.raises(RollbackOnlyError):
            await db.session.commit()
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert await keys(db) == set()


async def test_a_savepoint_left_open_does_not_carry_a_rollback_only_commit(db: Database) -> None:
    async def write_with_a_savepoint_left_open() -> None:
        async with db.session.begin():
            await db.session.begin_nested()  # never closed: the commit would release it
            await add_key(db, "doomed")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        db.set_rollback_only()
        with pytest.raises(RollbackOnlyError):
            await write_with_a_savepoint_left_open()
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 200
    assert await keys(db) == set()
    assert checked_out(db) == 0


@pytest.mark.parametrize("how", ["decorator", "pattern"])
async def test_a_read_only_route_that_writes_inside_begin_commits_nothing(
    db: Database, how: str
) -> None:
    # PostgreSQL refuses the write itself (SET TRANSACTION READ ONLY); elsewhere, such as
    # on SQLite, only the refused commit protects the data.
    sqlite = db.engine.dialect.name == "sqlite"
    expected: type[Exception] = RollbackOnlyError if sqlite else DBAPIError

    async def write(scope: Scope, receive: Receive, send: Send) -> None:
        with pytest.raises(expected):
            async with db.session.begin():
                await add_key(db, "written")
        await plain_response(send, 200)

    app = read_only(write) if how == "decorator" else write
    patterns = ["/*"] if how == "pattern" else []
    recorder = await call_http(SQLAlchemyMiddleware(app, db, read_only=patterns))

    assert recorder.status == 200
    assert await keys(db) == set()
    assert checked_out(db) == 0
