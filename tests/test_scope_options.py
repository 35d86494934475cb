"""Per-block options: ``db.scope(...)`` and ``db.new_session(...)`` take session options
(sessionmaker keywords), a commit policy and ``read_only``, for that block alone.

Async ``Database`` and ``SyncDatabase``, on SQLite and PostgreSQL.  The types the
blocks yield are checked by mypy (``assert_type``) when the suite is type-checked.
"""

from __future__ import annotations

import re
from typing import Any

import anyio
import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, registry
from typing_extensions import assert_type

from asgi_sqla import (
    ConfigurationError,
    Database,
    RollbackOnlyError,
    SQLAlchemyMiddleware,
    SyncDatabase,
)
from asgi_sqla.pytest_plugin import rolled_back, rolled_back_sync
from asgi_sqla.types import Receive, Scope, Send

from _helpers import (
    add_key,
    call_http,
    checked_out,
    items,
    keys,
    open_database,
    open_sync_database,
    orphan_child,
    plain_response,
    sync_checked_out,
    sync_keys,
)


class Item:
    """``items`` mapped, to watch ``autoflush`` and ``expire_on_commit`` at work."""

    id: int
    key: str

    def __init__(self, key: str) -> None:
        self.key = key


registry().map_imperatively(Item, items)


class BlockError(Exception):
    """Raised by a test inside a block."""


class OwnAsyncSession(AsyncSession):
    """A session class of the app's own, for the type checks."""


class OwnSession(Session):
    """A synchronous session class of the app's own, for the type checks."""


def settings(session: AsyncSession | Session) -> dict[str, object]:
    """The sessionmaker settings a session was made with (SQLAlchemy's own attributes)."""
    sync = session.sync_session if isinstance(session, AsyncSession) else session
    return {
        "expire_on_commit": sync.expire_on_commit,
        "autoflush": sync.autoflush,
        "info": dict(sync.info),
    }


DATABASE_SETTINGS = {"expire_on_commit": False, "autoflush": True, "info": {"app": "shop"}}
BLOCK_OPTIONS: dict[str, Any] = {
    "expire_on_commit": True,
    "autoflush": False,
    "info": {"block": "report"},
}
BLOCK_SETTINGS = {
    "expire_on_commit": True,
    "autoflush": False,
    "info": {"app": "shop", "block": "report"},
}


@pytest.fixture
def db_options() -> dict[str, Any]:
    return {"session_options": {"info": {"app": "shop"}}}


# -- session options -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_block_options_apply_to_that_block_only(db: Database) -> None:
    seen: dict[str, object] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with db.new_session(**BLOCK_OPTIONS) as independent:
            seen["new_session"] = settings(independent)
        seen["request"] = settings(db.session)
        await plain_response(send, 200)

    async with db.scope(**BLOCK_OPTIONS) as session:
        seen["scope"] = settings(session)
    async with db.scope() as session:
        seen["next scope"] = settings(session)
    await call_http(SQLAlchemyMiddleware(app, db))

    assert seen == {
        "scope": BLOCK_SETTINGS,
        "next scope": DATABASE_SETTINGS,
        "new_session": BLOCK_SETTINGS,
        "request": DATABASE_SETTINGS,
    }
    assert checked_out(db) == 0


@pytest.mark.anyio
async def test_autoflush_and_expire_on_commit_of_a_block_take_effect(db: Database) -> None:
    async with db.scope(autoflush=False, expire_on_commit=True) as session:
        session.add(Item("pending"))
        # Not flushed before the query: autoflush is off in this block.
        assert await session.scalar(select(Item).where(items.c.key == "pending")) is None
        await session.flush()
        item = await session.scalar(select(Item).where(items.c.key == "pending"))
        await session.commit()
        assert inspect(item).expired  # expire_on_commit=True
    async with db.scope() as session:
        session.add(Item("flushed"))
        item = await session.scalar(select(Item).where(items.c.key == "flushed"))
        assert item is not None  # autoflush: the database's default
        await session.commit()
        assert not inspect(item).expired  # expire_on_commit=False: the database's

    assert await keys(db) == {"pending", "flushed"}


@pytest.mark.anyio
async def test_a_block_keeps_its_options_after_release(db: Database) -> None:
    async with db.scope(**BLOCK_OPTIONS) as first:
        await db.release()
        second = db.session
        assert second is not first
        assert settings(second) == BLOCK_SETTINGS


# -- commit policy -------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("db_options", [{"commit_on": None}])
async def test_commit_true_commits_on_exit_even_when_commit_on_is_none(db: Database) -> None:
    async with db.scope(commit=True):
        await add_key(db, "committed")
    async with db.new_session(commit=True) as session:
        await session.execute(items.insert().values(key="new session"))
    async with db.scope():  # commit_on=None: nothing commits automatically
        await add_key(db, "default")

    assert await keys(db) == {"committed", "new session"}
    assert checked_out(db) == 0


@pytest.mark.anyio
@pytest.mark.parametrize("db_options", [{"commit_on": None}])
async def test_a_failed_commit_of_a_commit_true_block_is_raised_from_it(db: Database) -> None:
    with pytest.raises(IntegrityError, match=r"(?i)foreign key"):
        async with db.scope(commit=True):
            await orphan_child(db)

    assert checked_out(db) == 0


@pytest.mark.anyio
async def test_commit_true_still_rolls_back_on_an_exception(db: Database) -> None:
    error = BlockError("inside the block")

    with pytest.raises(BlockError) as raised:  # noqa: PT012
        async with db.scope(commit=True):
            await add_key(db, "discarded")
            raise error

    assert raised.value is error
    assert await keys(db) == set()
    assert checked_out(db) == 0


@pytest.mark.anyio
async def test_commit_false_rolls_back_on_normal_exit_and_the_next_block_commits(
    db: Database,
) -> None:
    async with db.scope(commit=False):
        await add_key(db, "dry run")
    async with db.new_session(commit=False) as session:
        await session.execute(items.insert().values(key="dry new session"))
    async with db.scope():
        await add_key(db, "kept")

    assert await keys(db) == {"kept"}
    assert checked_out(db) == 0


@pytest.mark.anyio
async def test_commit_false_leaves_explicit_commits_to_the_app(db: Database) -> None:
    async with db.scope(commit=False) as session:
        await add_key(db, "committed by hand")
        await session.commit()
        await add_key(db, "left over")

    assert await keys(db) == {"committed by hand"}


@pytest.mark.anyio
async def test_new_session_commit_false_beside_a_committing_request(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with db.new_session(commit=False) as session:
            await session.execute(items.insert().values(key="preview"))
        await add_key(db, "request")
        await plain_response(send, 201)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 201
    assert await keys(db) == {"request"}
    assert checked_out(db) == 0


# -- read_only -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_read_only_block_refuses_to_commit_and_the_next_block_is_not(
    db: Database,
) -> None:
    async with db.scope(read_only=True) as session:
        await session.execute(text("SELECT 1"))
        with pytest.raises(RollbackOnlyError, match="read-only"):
            await session.commit()
    async with db.new_session(read_only=True) as session:
        await session.execute(text("SELECT 1"))
        with pytest.raises(RollbackOnlyError, match="read-only"):
            await session.commit()
    async with db.scope() as session:
        await add_key(db, "writable")
        await session.commit()

    assert await keys(db) == {"writable"}
    assert checked_out(db) == 0


@pytest.mark.anyio
async def test_inside_a_read_only_route_a_block_stays_read_only_whatever_is_passed(
    db: Database,
) -> None:
    refused: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with db.scope(read_only=False, commit=True) as session:
            await session.execute(text("SELECT 1"))
            try:
                await session.commit()
            except RollbackOnlyError:
                refused.append("scope")
        async with db.new_session(read_only=False, commit=True) as session:
            await session.execute(text("SELECT 1"))
            try:
                await session.commit()
            except RollbackOnlyError:
                refused.append("new_session")
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db, read_only=["/"]))

    assert recorder.status == 200
    assert refused == ["scope", "new_session"]
    assert checked_out(db) == 0


@pytest.mark.anyio
async def test_a_read_only_block_with_commit_true_in_a_read_only_route_rolls_back(
    database_url: str,
) -> None:
    db = await open_database(database_url)
    written: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with db.scope(commit=True):
            try:
                await add_key(db, "sneaky")
                written.append("sneaky")  # SQLite has no read-only transactions
            except DBAPIError:  # PostgreSQL refuses the write itself
                pass
        await plain_response(send, 200)

    try:
        recorder = await call_http(SQLAlchemyMiddleware(app, db, read_only=["/"]))
        assert recorder.status == 200
        assert written == (["sneaky"] if db.engine.dialect.name == "sqlite" else [])
        assert await keys(db) == set()
        assert checked_out(db) == 0
    finally:
        await db.dispose()


# -- what a block refuses ------------------------------------------------------------------


REFUSED = [
    ({"class_": AsyncSession}, "session_class"),
    ({"sync_session_class": Session}, "session class"),
    ({"bind": None}, "bound to the Database's engine"),
    ({"binds": {}}, "bound to the Database's engine"),
    ({"twophase": True}, "two_phase"),
    ({"pool_timeout": 1}, "pool_timeout"),
    ({"expire_on_comit": True}, "'expire_on_comit'"),
    ({"autoflush": "no"}, "autoflush=True"),
    ({"info": ["not", "a", "dict"]}, "info must be a dict"),
    ({"join_transaction_mode": "sometimes"}, "join_transaction_mode must be one of"),
    ({"commit": "yes"}, "commit=True"),
    ({"read_only": 1}, "read_only=True"),
    ({"read_only": True, "commit": True}, "read-only block to commit"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("options", "says"), REFUSED)
async def test_a_block_refuses_options_it_cannot_have_before_opening_anything(
    db: Database, options: dict[str, Any], says: str
) -> None:
    for block in (db.scope, db.new_session):
        with pytest.raises(ConfigurationError, match=re.escape(says)):
            async with block(**options):
                pytest.fail("the block ran")
    assert checked_out(db) == 0


@pytest.mark.anyio
async def test_a_per_block_pool_timeout_is_refused_with_what_to_do_instead(db: Database) -> None:
    with pytest.raises(ConfigurationError) as raised:
        async with db.scope(pool_timeout=0.1):
            pass

    message = str(raised.value)
    assert "db.scope() does not take pool_timeout=" in message
    assert "one timeout for every checkout" in message
    assert "Database of its own" in message


# -- types -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_blocks_with_options_yield_the_database_session_type(database_url: str) -> None:
    db = Database(database_url, session_class=OwnAsyncSession)
    try:
        async with db.scope(autoflush=False, commit=False) as session:
            assert_type(session, OwnAsyncSession)
            assert isinstance(session, OwnAsyncSession)
        async with db.new_session(read_only=True, info={"x": 1}) as independent:
            assert_type(independent, OwnAsyncSession)
            assert isinstance(independent, OwnAsyncSession)
    finally:
        await db.dispose()


def test_sync_blocks_with_options_yield_the_database_session_type(
    sync_database_url: str,
) -> None:
    db = SyncDatabase(sync_database_url, session_class=OwnSession)
    try:
        with db.scope(autoflush=False, commit=False) as session:
            assert_type(session, OwnSession)
            assert isinstance(session, OwnSession)
        with db.new_session(read_only=True, info={"x": 1}) as independent:
            assert_type(independent, OwnSession)
            assert isinstance(independent, OwnSession)
    finally:
        db.dispose()


# -- SyncDatabase ----------------------------------------------------------------------------


def test_sync_block_options_apply_to_that_block_only(sync_db: SyncDatabase) -> None:
    with sync_db.scope(**BLOCK_OPTIONS) as session:
        in_scope = settings(session)
    with sync_db.new_session(**BLOCK_OPTIONS) as session:
        in_new_session = settings(session)
    with sync_db.scope() as session:
        in_next_scope = settings(session)

    assert in_scope == in_new_session == BLOCK_SETTINGS
    assert in_next_scope == DATABASE_SETTINGS


@pytest.mark.anyio
async def test_sync_block_options_inside_a_request_leave_its_session_alone(
    sync_db: SyncDatabase,
) -> None:
    seen: dict[str, object] = {}

    def handler() -> None:
        with sync_db.new_session(**BLOCK_OPTIONS) as independent:
            seen["new_session"] = settings(independent)
        seen["request"] = settings(sync_db.session)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(handler)
        await plain_response(send, 200)

    await call_http(SQLAlchemyMiddleware(app, sync_db))

    assert seen == {"new_session": BLOCK_SETTINGS, "request": DATABASE_SETTINGS}
    assert sync_checked_out(sync_db) == 0


def test_sync_commit_policies(sync_database_url: str) -> None:
    db = open_sync_database(sync_database_url, commit_on=None)
    try:
        with db.scope(commit=True) as session:
            session.execute(items.insert().values(key="committed"))
        with db.new_session(commit=True) as session:
            session.execute(items.insert().values(key="new session"))
        with db.scope() as session:  # commit_on=None
            session.execute(items.insert().values(key="default"))
        with db.scope(commit=False) as session:
            session.execute(items.insert().values(key="dry run"))
        with pytest.raises(BlockError), db.scope(commit=True) as session:  # noqa: PT012
            session.execute(items.insert().values(key="failed"))
            raise BlockError

        assert sync_keys(db) == {"committed", "new session"}
        assert sync_checked_out(db) == 0
    finally:
        db.dispose()


def test_sync_read_only_block_refuses_to_commit(sync_db: SyncDatabase) -> None:
    with sync_db.scope(read_only=True) as session:
        session.execute(text("SELECT 1"))
        with pytest.raises(RollbackOnlyError, match="read-only"):
            session.commit()
    with sync_db.scope() as session:
        session.execute(items.insert().values(key="writable"))

    assert sync_keys(sync_db) == {"writable"}
    assert sync_checked_out(sync_db) == 0


@pytest.mark.anyio
async def test_sync_block_in_a_read_only_route_stays_read_only(sync_db: SyncDatabase) -> None:
    refused: list[str] = []

    def handler() -> None:
        with sync_db.new_session(read_only=False, commit=True) as session:
            session.execute(text("SELECT 1"))
            try:
                session.commit()
            except RollbackOnlyError:
                refused.append("new_session")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(handler)
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, sync_db, read_only=["/"]))

    assert recorder.status == 200
    assert refused == ["new_session"]


@pytest.mark.parametrize(("options", "says"), REFUSED)
def test_sync_blocks_refuse_options_they_cannot_have(
    sync_db: SyncDatabase, options: dict[str, Any], says: str
) -> None:
    for block in (sync_db.scope, sync_db.new_session):
        with pytest.raises(ConfigurationError, match=re.escape(says)), block(**options):
            pytest.fail("the block ran")
    assert sync_checked_out(sync_db) == 0


# -- the pytest plugin ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_pytest_plugin_sessions_take_block_options_and_stay_in_the_test(
    db: Database,
) -> None:
    async with rolled_back(db):
        # control_fully would let the block's commit end the test's own transaction.
        async with db.scope(join_transaction_mode="control_fully", **BLOCK_OPTIONS) as session:
            seen = settings(session)
            await add_key(db, "in the test")
        async with db.scope() as session:
            assert await session.scalar(select(items.c.key)) == "in the test"

    assert seen == BLOCK_SETTINGS
    assert await keys(db) == set()


def test_the_sync_pytest_plugin_sessions_take_block_options_and_stay_in_the_test(
    sync_db: SyncDatabase,
) -> None:
    with rolled_back_sync(sync_db):
        with sync_db.scope(join_transaction_mode="control_fully", **BLOCK_OPTIONS) as session:
            seen = settings(session)
            session.execute(items.insert().values(key="in the test"))
        with sync_db.scope() as session:
            assert session.scalar(select(items.c.key)) == "in the test"

    assert seen == BLOCK_SETTINGS
    assert sync_keys(sync_db) == set()
