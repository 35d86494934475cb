"""Secrets never shown: passwords (in the URL's userinfo or its query) and SQL parameters.

A URL may carry its password as ``user:password@host`` or as a query parameter
(``?password=``, ``?sslpassword=``: asyncpg and libpq both take them), and a failed
statement's exception carries the row data it was sent.  Wherever the package shows a
URL or a driver's message (``repr``, ``lifespan.startup.failed``, its log records,
replica warnings, configuration errors), none of them may appear.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest
from sqlalchemy import URL, Column, Integer, MetaData, String, Table, create_engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import registry

from asgi_sqla import (
    CommitFailedError,
    ConfigurationError,
    Database,
    DatabaseStartupError,
    SQLAlchemyMiddleware,
)
from asgi_sqla._secrets import is_secret_key, mask_text, mask_url
from asgi_sqla.types import Receive, Scope, Send

from _helpers import ASGIRecorder, call_http, plain_response

pytestmark = pytest.mark.anyio

PASSWORD = "hunter2-secret"
SSL_PASSWORD = "key-passphrase-secret"
ROW_SECRET = "4111-1111-1111-1111"

LIFESPAN_SCOPE: Scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}


def free_port() -> int:
    """A loopback port nothing listens on (just freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def no_lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] != "lifespan"
    await plain_response(send, 204)


def shown_in_logs(caplog: pytest.LogCaptureFixture) -> str:
    """Every log record as a handler would write it: message and traceback."""
    return (
        "\n".join(f"{record.getMessage()}\n{record.exc_text or ''}" for record in caplog.records)
        + caplog.text
    )


# --- the helpers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"postgresql+asyncpg://user:{PASSWORD}@db:5432/app",
            "postgresql+asyncpg://user:***@db:5432/app",
        ),
        (
            f"postgresql+psycopg://user@db/app?sslpassword={PASSWORD}&password={PASSWORD}",
            "postgresql+psycopg://user@db/app?password=***&sslpassword=***",
        ),
        (
            f"postgresql+asyncpg://user@db/app?password={PASSWORD}&password=x&ssl=require",
            "postgresql+asyncpg://user@db/app?password=***&password=***&ssl=require",
        ),
        (
            "postgresql+psycopg://user@db/app?application_name=a+b&sslmode=verify-full",
            "postgresql+psycopg://user@db/app?application_name=a+b&sslmode=verify-full",
        ),
        (
            f"mysql+aiomysql://user@db/app?passwd={PASSWORD}&charset=utf8mb4",
            "mysql+aiomysql://user@db/app?charset=utf8mb4&passwd=***",
        ),
    ],
    ids=["userinfo", "query", "repeated", "no-secret", "mysql-passwd"],
)
def test_mask_url_shows_every_secret_as_stars(url: str, shown: str) -> None:
    assert mask_url(make_url(url)) == shown


def test_mask_url_reads_like_sqlalchemy_when_the_query_holds_no_secret() -> None:
    url = make_url(f"postgresql+asyncpg://user:{PASSWORD}@db/app?ssl=require&b=1")
    assert mask_url(url) == url.render_as_string(hide_password=True)


@pytest.mark.parametrize(
    "key",
    ["password", "sslpassword", "PASSWORD", "passwd", "oauth_client_secret", "auth_token"],
)
def test_query_keys_that_carry_secrets(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["passfile", "sslkey", "sslmode", "user", "application_name"])
def test_query_keys_that_do_not(key: str) -> None:
    assert not is_secret_key(key)


def test_mask_text_removes_every_secret_of_the_url_in_every_encoding() -> None:
    password = "p@ss word/1"
    url = URL.create(
        "postgresql+psycopg",
        username="user",
        password=password,
        host="db",
        query={"sslpassword": SSL_PASSWORD},
    )
    message = (
        f"could not connect with password {password!r} "
        f"(dsn postgresql://user:p%40ss%20word%2F1@db, "
        f"form p%40ss+word%2F1), sslpassword={SSL_PASSWORD}"
    )

    masked = mask_text(message, url)

    assert masked == (
        "could not connect with password '***' (dsn postgresql://user:***@db, "
        "form ***), sslpassword=***"
    )


def test_mask_text_leaves_a_message_alone_when_the_url_has_no_secret() -> None:
    url = make_url("postgresql+asyncpg://user@db/app?ssl=require")
    assert mask_text("role user does not exist", url) == "role user does not exist"


# --- repr -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        f"?password={PASSWORD}",
        f"?sslpassword={PASSWORD}",
        f"?ssl=require&password={PASSWORD}&application_name=app",
        f"?password={PASSWORD}&password=other-{PASSWORD}",
    ],
    ids=["password", "sslpassword", "among-others", "repeated"],
)
def test_repr_hides_a_password_given_in_the_query(query: str) -> None:
    shown = repr(Database(f"postgresql+asyncpg://user@db.invalid/app{query}"))

    assert PASSWORD not in shown
    assert "db.invalid/app" in shown
    assert "=***" in shown


def test_repr_keeps_query_values_that_are_not_secret() -> None:
    url = f"postgresql+asyncpg://user:{PASSWORD}@db.invalid/app?ssl=require&sslpassword=x"
    shown = repr(Database(url))

    assert "ssl=require" in shown
    assert "user:***@db.invalid/app" in shown
    assert "sslpassword=***" in shown


async def test_repr_of_an_engine_hides_a_password_given_in_the_query() -> None:
    engine = create_async_engine(f"postgresql+asyncpg://user@db.invalid/app?password={PASSWORD}")
    try:
        assert PASSWORD not in repr(Database(engine=engine))
    finally:
        await engine.dispose()


# --- configuration errors ---------------------------------------------------------------


def test_a_synchronous_engine_is_refused_without_its_query_password() -> None:
    engine = create_engine(f"postgresql+psycopg://user@db.invalid/app?password={PASSWORD}")
    try:
        with pytest.raises(ConfigurationError) as info:
            Database(engine=engine)  # type: ignore[arg-type]
        assert PASSWORD not in str(info.value)
        assert "AsyncEngine" in str(info.value)
    finally:
        engine.dispose()


def test_a_synchronous_driver_is_refused_without_its_query_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        Database(f"postgresql+psycopg2://user@db.invalid/app?password={PASSWORD}")
    assert PASSWORD not in str(info.value)
    assert "synchronous" in str(info.value)


@pytest.mark.usefixtures("aiomysql_not_installed")
def test_a_driver_that_is_not_installed_is_named_without_the_query_password() -> None:
    db = Database(f"mysql+aiomysql://user@db.invalid/app?password={PASSWORD}")

    with pytest.raises(ConfigurationError) as info:
        _ = db.engine

    assert "pip install 'asgi-sqla[aiomysql]'" in str(info.value)
    assert PASSWORD not in str(info.value)


# --- startup failures -------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_startup_failure_on_a_real_server_shows_no_query_password(
    postgres_server: URL, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A database that does not exist: the server refuses the connection whatever
    # its authentication method (the test cluster trusts every local connection).
    url = postgres_server.set(
        drivername=f"postgresql+{driver}",
        password=None,
        database="no_such_database",
        query={"password": PASSWORD},
    ).render_as_string(hide_password=False)
    db = Database(url)
    recorder = ASGIRecorder([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    caplog.set_level(logging.DEBUG, logger="asgi_sqla")

    with pytest.raises(DatabaseStartupError) as raised:  # what the app raises, servers log
        await recorder(SQLAlchemyMiddleware(no_lifespan_app, db), dict(LIFESPAN_SCOPE))

    assert recorder.types() == ["lifespan.startup.failed"]
    message = recorder.sent[0]["message"]
    assert "did not answer" in message
    assert "no_such_database" in message
    assert "password=***" in message
    assert PASSWORD not in message
    assert PASSWORD not in str(raised.value)
    assert caplog.records
    assert PASSWORD not in shown_in_logs(caplog)
    assert db._engine is None  # disposed


async def test_a_replica_that_is_down_is_logged_without_its_query_password(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    replica = f"postgresql+asyncpg://user@127.0.0.1:{free_port()}/app?password={PASSWORD}"
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'primary.db'}", replicas=[replica])
    recorder = ASGIRecorder([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    caplog.set_level(logging.DEBUG, logger="asgi_sqla")

    await recorder(SQLAlchemyMiddleware(no_lifespan_app, db), dict(LIFESPAN_SCOPE))

    assert recorder.types() == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Read replica" in w and "password=***" in w for w in warnings), warnings
    assert PASSWORD not in shown_in_logs(caplog)


# --- SQL parameters ---------------------------------------------------------------------

secrets_metadata = MetaData()

#: ``code`` is unique and the failure names only it; ``note`` is the row data to hide.
cards = Table(
    "cards",
    secrets_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("code", String(16), nullable=False, unique=True),
    Column("note", String(64), nullable=False),
)


class Card:
    code: str
    note: str

    def __init__(self, code: str, note: str) -> None:
        self.code = code
        self.note = note


registry().map_imperatively(Card, cards)


async def create_cards(db: Database) -> None:
    async with db.engine.begin() as connection:
        await connection.run_sync(secrets_metadata.create_all)
        await connection.execute(cards.insert().values(code="taken", note="first"))


def exception_chain(exc: BaseException | None) -> str:
    """``str`` of ``exc`` and of every exception it was raised from or during."""
    shown = []
    while exc is not None:
        shown.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(shown)


async def test_a_failed_commit_shows_no_sql_parameters(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(database_url)
    await create_cards(db)
    raised: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # Flushed at the commit, before the response starts: the duplicate code fails.
        db.session.add(Card("taken", ROW_SECRET))
        try:
            await plain_response(send, 201)
        except CommitFailedError as exc:
            raised.append(exc)
            raise

    caplog.set_level(logging.DEBUG, logger="asgi_sqla")
    try:
        recorder = await call_http(SQLAlchemyMiddleware(app, db))
    finally:
        await db.dispose()

    assert recorder.status == 500

    [exc] = raised
    chain = exception_chain(exc)
    assert "cards" in chain  # the database's own message is kept
    assert ROW_SECRET not in chain
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    assert ROW_SECRET not in shown_in_logs(caplog)


async def test_sql_parameters_can_be_shown_again_with_hide_parameters_false(
    tmp_path: Any,
) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", hide_parameters=False)
    await create_cards(db)
    try:
        with pytest.raises(IntegrityError) as raised:
            async with db.scope() as session:
                await session.execute(cards.insert().values(code="taken", note=ROW_SECRET))
    finally:
        await db.dispose()

    assert ROW_SECRET in str(raised.value)


async def test_every_engine_the_database_creates_hides_sql_parameters(tmp_path: Any) -> None:
    primary = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'primary.db'}")
    by_url = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    by_factory = Database(
        engine=lambda: primary, replicas=[f"sqlite+aiosqlite:///{tmp_path / 'replica.db'}"]
    )
    try:
        assert by_url.engine.sync_engine.hide_parameters
        [replica] = by_factory.replica_engines
        assert replica.sync_engine.hide_parameters
        assert not primary.sync_engine.hide_parameters  # the app's own engine is its own
    finally:
        await by_url.dispose()
        await by_factory.dispose()
        await primary.dispose()
