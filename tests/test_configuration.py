"""Configuration: URLs, engines, options, and the mistakes ``Database`` must explain."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import create_engine, inspect, make_url, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import registry
from sqlalchemy.pool import NullPool

from asgi_sqla import (
    ConcurrentSessionUseError,
    ConfigurationError,
    Database,
    SessionEndedError,
    SQLAlchemyMiddleware,
)
from asgi_sqla.types import Receive, Scope, Send

from _helpers import (
    ASGIRecorder,
    add_key,
    call_http,
    checked_out,
    create_tables,
    items,
    keys,
    plain_response,
    release,
)

pytestmark = pytest.mark.anyio

PASSWORD = "hunter2-secret"
#: The installed SQLAlchemy, as (major, minor): 2.0 and 2.1 differ in a URL's default driver.
SQLALCHEMY_VERSION = release("sqlalchemy")

LIFESPAN_SCOPE: Scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}


async def no_lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
    """An inner app that does not implement lifespan (the middleware answers for it)."""
    assert scope["type"] != "lifespan"
    await plain_response(send, 204)


async def run_lifespan(app: Any) -> ASGIRecorder:
    """Drive a complete startup + shutdown; return the recorder of what the server got."""
    recorder = ASGIRecorder([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    await recorder(app, dict(LIFESPAN_SCOPE))
    return recorder


@pytest.fixture
def no_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)


# --- URLs -------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_database_url")
def test_database_without_url_or_environment_names_database_url() -> None:
    with pytest.raises(ConfigurationError) as info:
        Database()

    assert "DATABASE_URL" in str(info.value)


async def test_database_url_from_the_environment_is_used(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    db = Database()
    try:
        assert db.engine.url == make_url(database_url)
        await create_tables(db)
        async with db.scope():
            await add_key(db, "from-env")
        assert await keys(db) == {"from-env"}
    finally:
        await db.dispose()


def test_an_explicit_url_wins_over_database_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://env:pw@env-host/env")
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'explicit.db'}")
    assert "explicit.db" in repr(db)
    assert "env-host" not in repr(db)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+asyncpg://user:{PASSWORD}@host:notaport/db",
        f"user:{PASSWORD}@host/db",
        f"postgresql+asyncpg://user:{PASSWORD}@[::1/db",
    ],
    ids=["bad-port", "no-scheme", "bad-ipv6"],
)
def test_a_malformed_url_is_a_configuration_error_that_hides_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Database(url)

    assert PASSWORD not in str(info.value)
    assert "dialect+driver://" in str(info.value)


def test_a_malformed_database_url_names_the_variable_and_hides_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql+asyncpg://user:{PASSWORD}@host:port/db")

    with pytest.raises(ConfigurationError) as info:
        Database()

    assert "DATABASE_URL" in str(info.value)
    assert PASSWORD not in str(info.value)


@pytest.mark.usefixtures("aiomysql_not_installed")
def test_a_driver_that_is_not_installed_names_the_pip_extra_and_hides_the_password() -> None:
    db = Database(f"mysql+aiomysql://user:{PASSWORD}@db.invalid/app")

    with pytest.raises(ConfigurationError) as info:
        _ = db.engine

    message = str(info.value)
    assert "pip install 'asgi-sqla[aiomysql]'" in message
    assert PASSWORD not in message


@pytest.mark.usefixtures("aiomysql_not_installed")
async def test_a_missing_driver_fails_lifespan_startup_with_the_fix() -> None:
    db = Database(f"mysql+aiomysql://user:{PASSWORD}@db.invalid/app")
    recorder = ASGIRecorder([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    with contextlib.suppress(ConfigurationError):  # what the app raises, servers log
        await recorder(SQLAlchemyMiddleware(no_lifespan_app, db), dict(LIFESPAN_SCOPE))

    assert recorder.types() == ["lifespan.startup.failed"]
    message = recorder.sent[0]["message"]
    assert "pip install 'asgi-sqla[aiomysql]'" in message
    assert "db.invalid" in message
    assert PASSWORD not in message


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite://"),
        (f"postgresql+psycopg2://user:{PASSWORD}@db.invalid/app", "postgresql+asyncpg://"),
    ],
    ids=["pysqlite", "psycopg2"],
)
def test_a_synchronous_driver_is_a_configuration_error_suggesting_an_async_one(
    url: str, driver: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Database(url)  # refused at construction, before any driver is imported

    message = str(info.value)
    assert "synchronous" in message
    assert driver in message
    assert PASSWORD not in message


async def test_postgresql_without_a_driver_follows_sqlalchemys_default_and_says_so() -> None:
    # SQLAlchemy 2.0's default for postgresql:// is psycopg2 (synchronous), 2.1's psycopg,
    # async as well: the lowest corner of the version matrix (noxfile.py) runs the first
    # branch, the newest corner the second.
    url = f"postgresql://user:{PASSWORD}@db.invalid/app"
    if SQLALCHEMY_VERSION < (2, 1):
        with pytest.raises(ConfigurationError) as info:
            Database(url)
        message = str(info.value)
        assert "names no driver" in message
        assert f"SQLAlchemy {sqlalchemy.__version__}" in message
        assert "'psycopg2'" in message
        assert "postgresql+asyncpg://" in message
        assert "postgresql+psycopg://" in message
        assert PASSWORD not in message
    else:
        db = Database(url)  # no connection is made
        try:
            assert db.engine.dialect.driver == "psycopg"
            assert db.engine.dialect.is_async
        finally:
            await db.dispose()


# --- engines ----------------------------------------------------------------------------


def test_a_synchronous_engine_is_refused() -> None:
    engine = create_engine("sqlite://")
    try:
        with pytest.raises(ConfigurationError) as info:
            Database(engine=engine)  # type: ignore[arg-type]
        assert "AsyncEngine" in str(info.value)
    finally:
        engine.dispose()


def test_an_engine_that_is_neither_an_engine_nor_a_factory_is_refused() -> None:
    with pytest.raises(ConfigurationError) as info:
        Database(engine="sqlite+aiosqlite://")  # type: ignore[arg-type]
    assert "AsyncEngine" in str(info.value)


async def test_an_engine_factory_returning_a_synchronous_engine_fails_at_startup() -> None:
    made: list[Any] = []

    def factory() -> Any:
        engine = create_engine("sqlite://")
        made.append(engine)
        return engine

    db = Database(engine=factory)  # accepted: the factory only runs at startup
    assert made == []
    recorder = ASGIRecorder([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    try:
        with contextlib.suppress(ConfigurationError):  # what the app raises, servers log
            await recorder(SQLAlchemyMiddleware(no_lifespan_app, db), dict(LIFESPAN_SCOPE))
    finally:
        for engine in made:
            engine.dispose()

    assert recorder.types() == ["lifespan.startup.failed"]
    assert "AsyncEngine" in recorder.sent[0]["message"]


async def test_an_engine_factory_returning_something_else_fails_at_first_use() -> None:
    db = Database(engine=lambda: "not an engine")  # type: ignore[arg-type,return-value]

    with pytest.raises(ConfigurationError) as info:
        _ = db.engine
    assert "AsyncEngine" in str(info.value)


def test_a_url_and_an_engine_together_are_refused(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ConfigurationError):
        Database(f"sqlite+aiosqlite:///{tmp_path / 'y.db'}", engine=engine)
    with pytest.raises(ConfigurationError):
        Database(engine=engine, pool_size=3)


@pytest.mark.parametrize("commit_on", [400, "below 400", True])
def test_commit_on_must_be_callable(commit_on: object, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", commit_on=commit_on)  # type: ignore[arg-type]
    assert "commit_on" in str(info.value)


# --- the middleware ---------------------------------------------------------------------


def test_the_middleware_needs_a_database() -> None:
    with pytest.raises(ConfigurationError) as info:
        SQLAlchemyMiddleware(no_lifespan_app)
    assert "Database" in str(info.value)


@pytest.mark.parametrize(
    "not_a_database",
    ["sqlite+aiosqlite:///x.db", make_url("sqlite+aiosqlite:///x.db"), None],
    ids=["str", "URL", "None"],
)
def test_the_middleware_refuses_what_is_not_a_database(not_a_database: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        SQLAlchemyMiddleware(no_lifespan_app, not_a_database)  # type: ignore[arg-type]
    assert "Database" in str(info.value)


def test_the_middleware_refuses_the_same_database_twice(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ConfigurationError) as info:
        SQLAlchemyMiddleware(no_lifespan_app, db, db)
    assert "twice" in str(info.value)


def test_configuration_errors_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="commit_on"):
        Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", commit_on=1)  # type: ignore[arg-type]


# --- repr -------------------------------------------------------------------------------


def test_repr_hides_the_password_of_a_url() -> None:
    db = Database(f"postgresql+asyncpg://user:{PASSWORD}@db.invalid:5432/app")
    shown = repr(db)
    assert PASSWORD not in shown
    assert "user:***@db.invalid:5432/app" in shown


async def test_repr_hides_the_password_of_an_engine() -> None:
    engine = create_async_engine(f"postgresql+asyncpg://user:{PASSWORD}@db.invalid/app")
    try:
        shown = repr(Database(engine=engine))
        assert PASSWORD not in shown
        assert "db.invalid" in shown
    finally:
        await engine.dispose()


def test_repr_hides_the_password_from_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql+asyncpg://user:{PASSWORD}@db.invalid/app")
    assert PASSWORD not in repr(Database())


# --- who disposes the engine ------------------------------------------------------------


async def test_an_engine_passed_by_the_user_is_not_disposed_at_shutdown(database_url: str) -> None:
    engine = create_async_engine(database_url)
    try:
        db = Database(engine=engine)
        await create_tables(db)
        pool = engine.sync_engine.pool

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, "through-the-user-engine")
            await plain_response(send, 201)

        wrapped = SQLAlchemyMiddleware(app, db)
        recorder = await run_lifespan(wrapped)
        assert recorder.types() == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

        # dispose() would have replaced the pool; the user's engine still works as it was.
        assert engine.sync_engine.pool is pool
        assert db.engine is engine
        response = await call_http(wrapped)
        assert response.status == 201
        async with engine.connect() as connection:
            rows = await connection.scalars(select(items.c.key))
            assert set(rows) == {"through-the-user-engine"}
        assert checked_out(db) == 0
    finally:
        await engine.dispose()


@pytest.mark.parametrize("source", ["url", "factory"])
async def test_an_engine_the_database_created_is_disposed_at_shutdown(
    database_url: str, source: str
) -> None:
    created: list[AsyncEngine] = []

    def factory() -> AsyncEngine:
        engine = create_async_engine(database_url)
        created.append(engine)
        return engine

    db = Database(database_url) if source == "url" else Database(engine=factory)
    pools: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if source == "url":
                        created.append(db.engine)
                    pools.append(db.engine.sync_engine.pool)
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    try:
        recorder = await run_lifespan(SQLAlchemyMiddleware(app, db))
        assert recorder.types() == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        [engine] = created
        [pool] = pools
        assert engine.sync_engine.pool is not pool  # dispose() replaced it
        assert pool.checkedin() == 0  # and closed the connection the startup check made
    finally:
        for engine in created:
            await engine.dispose()


# --- options pass through ---------------------------------------------------------------


class Item:
    key: str


registry().map_imperatively(Item, items)


@pytest.mark.parametrize("expire_on_commit", [None, True, False])
async def test_session_options_pass_through_expire_on_commit(
    tmp_path: Path, expire_on_commit: bool | None
) -> None:
    options = {} if expire_on_commit is None else {"expire_on_commit": expire_on_commit}
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", session_options=options)
    try:
        await create_tables(db)
        async with db.scope() as session:
            item = Item()
            item.key = "loaded"
            session.add(item)
            await session.commit()
            expired = "key" in inspect(item).expired_attributes
    finally:
        await db.dispose()

    # The package's default keeps loaded objects usable after the commit.
    assert expired is bool(expire_on_commit)


class CountingSession(AsyncSession):
    executed = 0

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        CountingSession.executed += 1
        return await super().execute(*args, **kwargs)


async def test_a_custom_session_class_is_used_and_still_guarded(tmp_path: Path) -> None:
    db = Database(
        f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", session_options={"class_": CountingSession}
    )
    await create_tables(db)
    CountingSession.executed = 0
    outcome: dict[str, object] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        session = db.session
        outcome["class"] = isinstance(session, CountingSession)
        await session.execute(items.insert().values(key="custom"))
        outcome["kept"] = session
        await plain_response(send, 201)

    try:
        recorder = await call_http(SQLAlchemyMiddleware(app, db))
        assert recorder.status == 201
        assert outcome["class"] is True
        assert CountingSession.executed == 1  # its own override ran, under the guard
        assert await keys(db) == {"custom"}

        kept = outcome["kept"]
        assert isinstance(kept, AsyncSession)
        with pytest.raises(SessionEndedError):  # the guard retired it at response start
            await kept.execute(text("SELECT 1"))
        assert checked_out(db) == 0
    finally:
        await db.dispose()


async def test_a_custom_session_class_still_refuses_concurrent_use(tmp_path: Path) -> None:
    db = Database(
        f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", session_options={"class_": CountingSession}
    )
    await create_tables(db)

    async def count() -> None:
        await db.session.execute(select(items.c.key))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "first")
        await asyncio.gather(count(), count())
        await plain_response(send, 201)

    try:
        with pytest.raises(ConcurrentSessionUseError):
            await call_http(SQLAlchemyMiddleware(app, db))
        assert checked_out(db) == 0
        assert await keys(db) == set()
    finally:
        await db.dispose()


async def test_engine_options_pass_through(database_url: str) -> None:
    db = Database(database_url, pool_size=2, max_overflow=0, pool_timeout=7)
    try:
        pool = db.engine.sync_engine.pool
        assert pool.size() == 2  # type: ignore[attr-defined]
        assert pool._max_overflow == 0  # type: ignore[attr-defined]
        assert pool._timeout == 7  # type: ignore[attr-defined]
    finally:
        await db.dispose()


async def test_engine_options_reach_the_connection(tmp_path: Path) -> None:
    db = Database(
        f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
        execution_options={"isolation_level": "SERIALIZABLE"},
    )
    try:
        async with db.scope() as session:
            connection = await session.connection()
            assert await connection.get_isolation_level() == "SERIALIZABLE"
    finally:
        await db.dispose()


def test_an_unknown_dialect_is_refused_at_construction_without_the_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        Database(f"nosuchdb+nosuchdriver://user:{PASSWORD}@db.invalid/app")

    message = str(info.value)
    assert "nosuchdb+nosuchdriver" in message
    assert PASSWORD not in message


# --- mistakes found at construction, not at startup -------------------------------------
#
# An option SQLAlchemy would only refuse when the engine or the first session is made
# (at lifespan startup, or at the first request without lifespan) is refused by
# Database() itself, with a ConfigurationError naming the option, not a bare TypeError
# from deep inside a worker.

PG_URL = f"postgresql+asyncpg://user:{PASSWORD}@db.invalid/app"


@pytest.mark.parametrize(
    ("url", "options", "named"),
    [
        (PG_URL, {"bogus": 1}, "bogus"),
        (PG_URL, {"pool_sise": 5, "pool_size": 5}, "pool_sise"),
        ("sqlite+aiosqlite://", {"pool_size": 5}, "pool_size"),  # StaticPool has no size
        (PG_URL, {"poolclass": NullPool, "max_overflow": 2}, "max_overflow"),
    ],
    ids=["unknown", "misspelt", "not-for-this-pool", "not-for-nullpool"],
)
def test_an_engine_option_sqlalchemy_does_not_take_is_refused_at_construction(
    url: str, options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Database(url, **options)

    message = str(info.value)
    assert repr(named) in message
    assert "create_async_engine" in message
    assert PASSWORD not in message


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("pool_size", "5"),
        ("pool_size", -1),
        ("pool_size", 2.5),
        ("pool_size", True),
        ("max_overflow", "x"),
        ("max_overflow", -2),
        ("pool_timeout", "1"),
        ("pool_timeout", float("nan")),
        ("pool_timeout", float("inf")),
        ("pool_recycle", "3600"),
        ("pool_pre_ping", "yes"),
        ("pool_pre_ping", 1),
        ("pool_use_lifo", "no"),
        ("echo", "yes"),
        ("echo_pool", 1),
        ("hide_parameters", "no"),
        ("query_cache_size", 1.5),
        ("isolation_level", 3),
        ("connect_args", "timeout=3"),
        ("execution_options", ["isolation_level"]),
    ],
)
def test_an_ill_typed_engine_option_is_refused_at_construction(option: str, value: object) -> None:
    options: dict[str, Any] = {option: value}
    with pytest.raises(ConfigurationError) as info:
        Database(PG_URL, **options)

    message = str(info.value)
    assert f"{option} must be" in message
    assert repr(value) in message
    assert PASSWORD not in message


@pytest.mark.parametrize(
    "options",
    [
        {"max_overflow": -1, "pool_recycle": -1},  # SQLAlchemy's "no limit" / "never"
        {"pool_timeout": 0.5, "pool_size": 0},
        {"echo": "debug", "echo_pool": "debug"},
        {"echo": None},
        {"isolation_level": "AUTOCOMMIT", "connect_args": {}, "execution_options": {}},
    ],
    ids=["minus-one", "numbers", "debug", "none", "mappings"],
)
async def test_engine_options_sqlalchemy_takes_are_accepted(options: dict[str, Any]) -> None:
    db = Database(PG_URL, **options)
    engine = db.engine
    try:
        for option, value in options.items():
            if option == "echo_pool":
                assert engine.sync_engine.pool.echo == value
            elif option == "echo":
                assert engine.echo == value
    finally:
        await db.dispose()


def test_validating_engine_options_opens_no_connection() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        db = Database(
            f"postgresql+asyncpg://user:{PASSWORD}@127.0.0.1:{port}/app",
            pool_size=1,
            pool_pre_ping=True,
        )
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked
    assert db._engine is None  # the engine itself is made at startup


@pytest.mark.parametrize(
    ("session_options", "named"),
    [
        ({"bogus": 1}, "'bogus'"),
        ({"expire_on_commit": "no"}, "expire_on_commit must be"),
        ({"autoflush": 1}, "autoflush must be"),
        ({"autobegin": None}, "autobegin must be"),
        ({"join_transaction_mode": "savepoint"}, "join_transaction_mode must be"),
        ({"class_": "AsyncSession"}, "class_ must be"),
        ({"class_": Item}, "class_ must be"),
        ({"bind": None}, "'bind'"),
        ({"info": "x"}, "info must be"),
    ],
    ids=[
        "unknown",
        "expire_on_commit",
        "autoflush",
        "autobegin",
        "join_transaction_mode",
        "class-name",
        "not-a-session-class",
        "bind",
        "info",
    ],
)
def test_a_bad_session_option_is_refused_at_construction(
    session_options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Database(PG_URL, session_options=session_options)

    assert named in str(info.value)
    assert "session_options" in str(info.value)


def test_session_options_must_be_a_mapping() -> None:
    with pytest.raises(ConfigurationError, match="session_options"):
        Database(PG_URL, session_options=[("expire_on_commit", True)])  # type: ignore[arg-type]


def test_an_unknown_option_of_a_custom_session_class_is_accepted() -> None:
    class TenantSession(AsyncSession):
        def __init__(self, *args: Any, tenant: str = "", **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.tenant = tenant

    Database(PG_URL, session_options={"class_": TenantSession, "tenant": "acme"})


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("warn_held_over", "1"),
        ("warn_held_over", float("nan")),
        ("warn_held_over", -1),
        ("warn_held_over", True),
        ("warn_statements_over", "3"),
        ("warn_statements_over", 2.5),
        ("warn_statements_over", float("inf")),
        ("replica_cooldown", float("nan")),
        ("replica_cooldown", float("inf")),
        ("replica_cooldown", "30"),
        ("stats", "no"),
        ("stats", 1),
    ],
)
def test_a_bad_database_option_is_refused_at_construction(option: str, value: object) -> None:
    options: dict[str, Any] = {option: value}
    with pytest.raises(ConfigurationError) as info:
        Database(PG_URL, **options)

    assert f"{option} must be" in str(info.value)
    assert repr(value) in str(info.value)


def test_replica_cooldown_is_checked_with_replicas_too() -> None:
    with pytest.raises(ConfigurationError, match="replica_cooldown must be"):
        Database(PG_URL, replicas=[PG_URL], replica_cooldown=float("nan"))


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("retry_backoff", float("inf")),
        ("retry_backoff", float("nan")),
        ("retry_backoff", "0.1"),
        ("retry_backoff", -0.5),
        ("retry_backoff", True),
        ("retry_after", float("nan")),
        ("retry_attempts", 1.5),
        ("retry_attempts", "3"),
        ("retry_attempts", False),
        ("retry_body_limit", -1),
        ("retry_body_limit", float("inf")),
        ("server_timing", "no"),
        ("server_timing", 1),
        ("two_phase", "yes"),
        ("two_phase", 0),
    ],
)
def test_a_bad_middleware_option_is_refused_at_construction(option: str, value: object) -> None:
    options: dict[str, Any] = {option: value}
    with pytest.raises(ConfigurationError) as info:
        SQLAlchemyMiddleware(no_lifespan_app, Database(PG_URL), **options)

    assert f"{option} must be" in str(info.value)
    assert repr(value) in str(info.value)


def test_every_middleware_number_takes_zero() -> None:
    SQLAlchemyMiddleware(
        no_lifespan_app,
        Database(PG_URL),
        retry_after=0,
        retry_attempts=0,
        retry_body_limit=0,
        retry_backoff=0,
        server_timing=False,
        two_phase=False,
    )
