"""Rotating credentials: ``password=provider``, asked for every new connection.

The provider's password is what the server checks: on a PostgreSQL cluster of this
module's own, each test's role authenticates with scram-sha-256, and the rotation test
changes the role's password with ``ALTER ROLE`` while requests run, the provider
returning the new one from then on.  The password never shows: not in ``repr(db)``,
log records, the package's errors, nor the exceptions of a refused login.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import sys
import threading
import traceback
import types
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.lowlevel
import psycopg
import pytest
from asyncpg import InvalidPasswordError  # type: ignore[import-untyped]  # no type information
from psycopg import sql
from sqlalchemy import URL, Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from asgi_sqla import (
    ConfigurationError,
    Database,
    DatabaseStartupError,
    SQLAlchemyMiddleware,
    SyncDatabase,
)
from asgi_sqla.types import Receive, Scope, Send

import _postgres
from _helpers import (
    ASGIRecorder,
    DedicatedPostgres,
    add_key,
    call_http,
    create_tables,
    http_scope,
    items,
    keys,
    plain_response,
    postgres_unavailable,
    release,
)

pytestmark = pytest.mark.anyio

#: The installed SQLAlchemy, as (major, minor): 2.0 and 2.1 report a failed login apart.
SQLALCHEMY_VERSION = release("sqlalchemy")
DOCS = Path(__file__).resolve().parent.parent / "docs/guides/credentials.md"
LIFESPAN_SCOPE: Scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}


@pytest.fixture(scope="module")
def pg() -> Iterator[DedicatedPostgres]:
    """A cluster of this module's own, where roles may have passwords the server checks."""
    try:
        with DedicatedPostgres() as cluster:
            yield cluster
    except _postgres.PostgresUnavailable as exc:
        postgres_unavailable(str(exc))


class Role:
    """A login role with a password (scram-sha-256), and a database it owns."""

    def __init__(self, pg: DedicatedPostgres) -> None:
        self.name = f"r_{uuid.uuid4().hex[:12]}"
        self.password = secrets.token_hex(16)
        self.admin = pg.admin
        self.url: URL = pg.add_password_role(self.name, self.password)

    def with_driver(self, driver: str, password: str | None = None) -> str:
        """The role's URL for ``driver``, with ``password`` (default: the role's) in it."""
        url = self.url.set(drivername=driver, password=password or self.password)
        return url.render_as_string(hide_password=False)

    def set_password(self, password: str) -> None:
        """``ALTER ROLE ... PASSWORD``: new logins must give ``password``."""
        with _postgres.connect(self.admin) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(self.name), sql.Literal(password)
                )
            )

    def logs_in_with(self, password: str) -> bool:
        """Whether the server accepts a new login with ``password`` (or refuses it)."""
        try:
            _postgres.connect(self.url.set(password=password)).close()
        except psycopg.OperationalError as exc:
            if "password authentication failed" in str(exc):
                return False
            raise
        return True


@pytest.fixture
def role(pg: DedicatedPostgres) -> Role:
    return Role(pg)


def shown(exc: BaseException | None, caplog: pytest.LogCaptureFixture) -> str:
    """Everything a server could show of ``exc`` and the log: each message, each traceback."""
    parts = [caplog.text]
    parts += [f"{r.getMessage()}\n{r.exc_text or ''}" for r in caplog.records]
    if exc is not None:
        parts += traceback.format_exception(exc)
        parts += [str(e) for e in chain(exc)]
    return "\n".join(parts)


def chain(exc: BaseException | None) -> list[BaseException]:
    found: list[BaseException] = []
    while exc is not None and len(found) < 10:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


def sync_engine(db: Database | SyncDatabase) -> Engine:
    engine = db.engine
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine


# -- rotation under load ---------------------------------------------------------------


class SecretStore:
    """What the provider reads: the role's current password, which a rotation changes on
    the server, as a secrets manager's rotation does.

    Rotation and provider share a lock.  PostgreSQL keeps one password per role, where
    a secrets store keeps the old one valid until the leases on it end; so a rotation
    also waits until no connection attempt holds a password the server has not checked
    yet (from the provider's answer to the pool's ``connect`` event), and new requests
    wait for the rotation (``opened``).  Requests holding a connection go on meanwhile.
    That makes "no request fails" exact rather than lucky.
    """

    def __init__(self, role: Role, loop: asyncio.AbstractEventLoop) -> None:
        self._role = role
        self._loop = loop
        self._lock = threading.Lock()
        self._current = role.password
        self._pending: str | None = None
        self._attempts = 0  # between the provider's answer and the connection
        self.history = [role.password]  # every password the role had, in order
        self.handed_out: list[str] = []
        self.connects = 0
        #: Requests running when each rotation changed the password on the server.
        self.running_at_rotation: list[int] = []
        self.running = 0
        self.opened = asyncio.Event()
        self.opened.set()

    def password(self) -> str:
        """The sync provider."""
        with self._lock:
            self._attempts += 1
            self.handed_out.append(self._current)
            return self._current

    async def password_async(self) -> str:
        """The async provider: a round trip to the store, then the password."""
        await anyio.lowlevel.checkpoint()
        return self.password()

    def connected(self, dbapi_connection: Any, record: Any) -> None:
        """The pool's ``connect`` event: the server accepted the password."""
        with self._lock:
            self._attempts -= 1
            self.connects += 1
            self._rotate_if_idle()

    def rotate(self) -> None:
        """Start a rotation; ``opened`` is set again once the server has the new password."""
        with self._lock:
            if self._pending is None:
                self.opened.clear()
                self._pending = secrets.token_hex(16)
                self._rotate_if_idle()

    def _rotate_if_idle(self) -> None:
        if self._pending is None or self._attempts:
            return
        self._role.set_password(self._pending)
        self._current = self._pending
        self.history.append(self._pending)
        self.running_at_rotation.append(self.running)
        self._pending = None
        self._loop.call_soon_threadsafe(self.opened.set)


def rotation_app(
    db: Database | SyncDatabase, store: SecretStore
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """Inserts the request's path as a key (``def`` code in a thread for a SyncDatabase),
    then answers 201."""

    def add_sync(key: str) -> None:
        assert isinstance(db, SyncDatabase)
        db.session.execute(items.insert().values(key=key))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        store.running += 1
        try:
            key = scope["path"].lstrip("/")
            if isinstance(db, SyncDatabase):
                await anyio.to_thread.run_sync(add_sync, key)
            else:
                await add_key(db, key)
            await plain_response(send, 201)
        finally:
            store.running -= 1

    return app


VARIANTS = [
    pytest.param("postgresql+asyncpg", "async", id="asyncpg-async-provider"),
    pytest.param("postgresql+asyncpg", "sync", id="asyncpg-sync-provider"),
    pytest.param("postgresql+psycopg", "async", id="psycopg-async-provider"),
    pytest.param("postgresql+psycopg", "sync", id="psycopg-sync-provider"),
    pytest.param("postgresql+psycopg", "SyncDatabase", id="SyncDatabase-psycopg"),
]
REQUESTS = 80
CLIENTS = 8
ROTATIONS = 4


@pytest.mark.postgresql
@pytest.mark.parametrize(("driver", "kind"), VARIANTS)
async def test_rotating_the_password_mid_run_fails_no_request(
    role: Role, driver: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = SecretStore(role, asyncio.get_running_loop())
    url = role.with_driver(driver)  # the first password is in the URL too: the provider wins
    db: Database | SyncDatabase
    if kind == "SyncDatabase":
        db = SyncDatabase(url, password=store.password, poolclass=NullPool)
    else:
        provider = store.password_async if kind == "async" else store.password
        db = Database(url, password=provider, poolclass=NullPool)  # a new connection per request
    event.listen(sync_engine(db), "connect", store.connected)
    if isinstance(db, SyncDatabase):
        with db.engine.begin() as connection:
            items.create(connection)
    else:
        await create_tables(db)
    caplog.set_level(logging.DEBUG)  # the pool's and asgi_sqla's records, DEBUG included
    app = SQLAlchemyMiddleware(rotation_app(db, store), db)
    failures: list[str] = []
    started = 0

    async def client(stop: anyio.CancelScope) -> None:
        nonlocal started
        while started < REQUESTS:
            await store.opened.wait()
            if started == REQUESTS:
                break
            started += 1
            number = started
            if number % (REQUESTS // (ROTATIONS + 1)) == 0 and number < REQUESTS:
                # At the start of a request, not its end: by its end the other clients
                # may have started every remaining request, leaving no connection to be
                # made with the last password.
                store.rotate()
            try:
                recorder = await call_http(app, f"/k{number}")
                if recorder.status != 201:
                    failures.append(f"request {number}: {recorder.status}")
            except Exception as exc:
                failures.append(f"request {number}: {type(exc).__name__}: {exc}")
            if failures:  # a failed login never ends its attempt: no rotation would follow
                stop.cancel()

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(CLIENTS):
                    tg.start_soon(client, tg.cancel_scope)
        assert failures == []
        assert len(store.history) == ROTATIONS + 1
        # Requests were running (holding connections) while the password changed.
        assert sum(store.running_at_rotation) > 0, store.running_at_rotation
        # The provider was asked for every new connection, and gave out each password.
        assert len(store.handed_out) == store.connects
        assert set(store.handed_out) == set(store.history)
        if isinstance(db, SyncDatabase):
            with db.engine.connect() as connection:
                committed = set(connection.scalars(text("SELECT key FROM items")))
        else:
            committed = await keys(db)
        assert committed == {f"k{n}" for n in range(1, REQUESTS + 1)}
    finally:
        if isinstance(db, SyncDatabase):
            db.dispose()
        else:
            await db.dispose()
    # The rotations were real: the server now refuses every password but the last.
    assert [role.logs_in_with(p) for p in store.history] == [False] * ROTATIONS + [True]
    log = shown(None, caplog)
    assert not [p for p in store.history if p in log]
    assert not [p for p in store.history if p in repr(db)]


@pytest.mark.postgresql
@pytest.mark.parametrize("driver", ["postgresql+asyncpg", "postgresql+psycopg"])
async def test_pooled_connections_keep_working_after_a_rotation_and_new_ones_ask_again(
    role: Role, driver: str
) -> None:
    calls: list[str] = []
    current = [role.password]

    def provider() -> str:
        calls.append(current[0])
        return current[0]

    db = Database(role.with_driver(driver, "not-the-password"), password=provider, pool_size=1)
    try:
        await create_tables(db)
        assert calls == [role.password]
        current[0] = secrets.token_hex(16)
        role.set_password(current[0])
        # PostgreSQL authenticates at connect only: the pooled connection still works.
        async with db.scope() as session:
            await session.execute(items.insert().values(key="pooled"))
        assert len(calls) == 1
        await db.dispose()  # the next connection is a new one
        async with db.scope() as session:
            await session.execute(items.insert().values(key="new"))
        assert calls == [role.password, current[0]]
        assert await keys(db) == {"pooled", "new"}
    finally:
        await db.dispose()


@pytest.mark.postgresql
@pytest.mark.parametrize("driver", ["postgresql+asyncpg", "postgresql+psycopg"])
async def test_a_request_cancelled_while_the_provider_awaits_leaks_no_connection(
    role: Role, driver: str
) -> None:
    """A client gone, or a deadline, while an async provider waits for its store: the
    pool's only slot is given back, and the next request gets it."""
    calls = 0
    asked, store_answers = anyio.Event(), anyio.Event()

    async def provider() -> str:
        nonlocal calls
        calls += 1
        asked.set()
        await store_answers.wait()
        return role.password

    db = Database(
        role.with_driver(driver, "wrong"),
        password=provider,
        pool_size=1,
        max_overflow=0,
        pool_timeout=2,
    )
    try:
        with anyio.move_on_after(10) as waiting:
            async with anyio.create_task_group() as tg:
                tg.start_soon(one_request, db)
                await asked.wait()
                tg.cancel_scope.cancel()  # the request, cancelled inside the provider
        assert not waiting.cancelled_caught
        assert db.pool_status().checked_out == 0
        store_answers.set()
        assert await one_request(db) == ([200], None)
        assert calls == 2
        assert db.pool_status().checked_out == 0
    finally:
        await db.dispose()


# -- the engines the provider serves ---------------------------------------------------------


@pytest.mark.postgresql
async def test_a_sync_function_that_returns_an_awaitable_is_awaited(role: Role) -> None:
    async def fetch() -> str:
        await anyio.lowlevel.checkpoint()
        return role.password

    db = Database(role.with_driver("postgresql+asyncpg", "wrong"), password=lambda: fetch())
    try:
        async with db.scope() as session:
            assert await session.scalar(text("SELECT current_user")) == role.name
    finally:
        await db.dispose()


@pytest.mark.postgresql
async def test_an_object_with_an_async_call_is_an_async_provider(role: Role) -> None:
    class Vault:
        async def __call__(self) -> str:
            await anyio.lowlevel.checkpoint()
            return role.password

    db = Database(role.with_driver("postgresql+psycopg", "wrong"), password=Vault())
    try:
        async with db.scope() as session:
            assert await session.scalar(text("SELECT current_user")) == role.name
    finally:
        await db.dispose()
    with pytest.raises(ConfigurationError, match="async function"):
        SyncDatabase(role.with_driver("postgresql+psycopg"), password=Vault())  # type: ignore[arg-type]


@pytest.mark.postgresql
async def test_replicas_connect_with_the_providers_password(
    role: Role, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    def provider() -> str:
        nonlocal calls
        calls += 1
        return role.password

    wrong = role.with_driver("postgresql+asyncpg", "wrong")
    db = Database(wrong, replicas=[wrong], password=provider)
    caplog.set_level(logging.WARNING, logger="asgi_sqla")
    replica_connects = 0

    def on_replica_connect(*args: object) -> None:
        nonlocal replica_connects
        replica_connects += 1

    try:
        event.listen(db.replica_engines[0].sync_engine, "connect", on_replica_connect)
        async with db.scope():
            assert await db.read_session.scalar(text("SELECT current_user")) == role.name
        assert replica_connects == 1
        assert calls == 1  # the read went to the replica, not to the primary
        assert not caplog.records  # no replica was marked down
    finally:
        await db.dispose()


@pytest.mark.postgresql
async def test_an_engine_factory_gets_the_provider_once_per_connection(role: Role) -> None:
    calls = 0

    def provider() -> str:
        nonlocal calls
        calls += 1
        return role.password

    made = [create_async_engine(role.with_driver("postgresql+asyncpg", "wrong"))]

    def factory() -> AsyncEngine:
        return made[-1]  # the same engine again after a dispose, then a new one

    db = Database(engine=factory, password=provider)
    try:
        for engine_number in (1, 1, 2):
            if engine_number == 2:
                made.append(create_async_engine(role.with_driver("postgresql+asyncpg", "x")))
            async with db.scope() as session:
                assert await session.scalar(text("SELECT current_user")) == role.name
            await db.dispose()  # the next scope connects anew
        assert calls == 3
    finally:
        await db.dispose()


@pytest.mark.postgresql
def test_a_sync_database_asks_in_the_connecting_thread_with_psycopg2(role: Role) -> None:
    threads: list[str] = []

    def provider() -> str:
        threads.append(threading.current_thread().name)
        return role.password

    db = SyncDatabase(role.with_driver("postgresql+psycopg2", "wrong"), password=provider)
    try:
        with db.scope() as session:
            assert session.scalar(text("SELECT current_user")) == role.name
        assert threads == [threading.current_thread().name]
    finally:
        db.dispose()


# -- never shown ---------------------------------------------------------------------------


async def one_request(db: Database) -> tuple[list[int], BaseException | None]:
    """A request whose app reads the database: the statuses the middleware sent (none
    when the app raised: the server answers 500 then), and what the app raised."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.session.execute(text("SELECT 1"))
        await plain_response(send, 200)

    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    raised: BaseException | None = None
    try:
        with anyio.fail_after(10):
            await recorder(SQLAlchemyMiddleware(app, db), http_scope("/"))
    except Exception as exc:
        raised = exc
    starts = [m["status"] for m in recorder.sent if m["type"] == "http.response.start"]
    return starts, raised


@pytest.mark.postgresql
@pytest.mark.parametrize("driver", ["postgresql+asyncpg", "postgresql+psycopg"])
async def test_a_wrong_password_from_the_provider_is_refused_and_never_shown(
    role: Role, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-" + secrets.token_hex(12)
    db = Database(role.with_driver(driver), password=lambda: wrong)
    caplog.set_level(logging.DEBUG)
    try:
        status, raised = await one_request(db)
        if driver == "postgresql+asyncpg":
            # asyncpg gives the refusal its SQLSTATE (28P01): an error like any other,
            # which reaches the server (its 500).  SQLAlchemy 2.1 wraps it in a
            # DBAPIError; 2.0 lets asyncpg's own error out of the connect.
            assert status == []
            refusal = DBAPIError if SQLALCHEMY_VERSION >= (2, 1) else InvalidPasswordError
            assert isinstance(raised, refusal), raised
        else:
            # libpq reports a failed connection without a SQLSTATE: the database could
            # not be reached, a 503 (docs/failover.md), and the error is in the log.
            assert status == [503]
            raised = answered_503_for(caplog)
        assert "password authentication failed" in str(raised)
        # At startup, through the lifespan: the failure names the database, not the password.
        startup = ASGIRecorder([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
        with pytest.raises(DatabaseStartupError) as at_startup:
            await startup(SQLAlchemyMiddleware(_no_lifespan_app, db), dict(LIFESPAN_SCOPE))
        assert startup.types() == ["lifespan.startup.failed"]
        message = startup.sent[0]["message"]
        assert "did not answer" in message
        text_shown = shown(raised, caplog) + shown(at_startup.value, caplog) + message
        assert wrong not in text_shown
        assert role.password not in text_shown  # the URL's, replaced by the provider's
        assert wrong not in repr(db)
    finally:
        await db.dispose()


async def _no_lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("the lifespan never reaches the app: startup failed")


@pytest.mark.postgresql
@pytest.mark.parametrize("driver", ["postgresql+asyncpg", "postgresql+psycopg"])
async def test_a_provider_that_raises_is_answered_503_and_logged_with_its_cause(
    role: Role, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    sealed = [False]

    def provider() -> str:
        if sealed[0]:
            raise RuntimeError("the vault is sealed")
        return role.password

    db = Database(role.with_driver(driver, "wrong"), password=provider, poolclass=NullPool)
    caplog.set_level(logging.DEBUG)
    try:
        assert await one_request(db) == ([200], None)
        sealed[0] = True
        # No connection could be made: 503 with Retry-After, whatever the driver, and
        # the log shows why, the provider's exception as the cause of the driver's.
        assert await one_request(db) == ([503], None)
        raised = answered_503_for(caplog)
        assert isinstance(raised, OperationalError), raised
        causes = chain(raised)
        assert any(isinstance(e, RuntimeError) and "vault is sealed" in str(e) for e in causes)
        assert "password provider" in str(raised)
        assert role.password not in shown(raised, caplog)
        sealed[0] = False
        assert await one_request(db) == ([200], None)  # the provider recovered: so do requests
    finally:
        await db.dispose()


def answered_503_for(caplog: pytest.LogCaptureFixture) -> BaseException:
    """The exception of the middleware's last "answered 503" warning."""
    records = [r for r in caplog.records if "answered 503" in r.getMessage() and r.exc_info]
    assert records, "no 503 warning with its exception was logged"
    exc_info = records[-1].exc_info
    assert exc_info is not None
    assert exc_info[1] is not None
    return exc_info[1]


# -- refused ---------------------------------------------------------------------------


SQLITE = "sqlite+aiosqlite:///:memory:"
PG_ASYNC = "postgresql+asyncpg://app@db/app"
PG_SYNC = "postgresql+psycopg://app@db/app"


async def async_provider() -> str:
    return "secret"


@pytest.mark.parametrize(
    ("make", "fix"),
    [
        (lambda: Database(PG_ASYNC, password=cast(Any, "hunter2")), "put a fixed password in"),
        (lambda: SyncDatabase(PG_SYNC, password=cast(Any, b"hunter2")), "put a fixed password"),
        (lambda: Database(PG_ASYNC, password=cast(Any, 42)), "zero-argument function"),
        (lambda: SyncDatabase(PG_SYNC, password=cast(Any, async_provider)), "a plain function"),
        (
            lambda: Database(engine=create_async_engine(PG_ASYNC), password=lambda: "x"),
            "add a 'do_connect' listener",
        ),
        (
            lambda: SyncDatabase(engine=create_engine(PG_SYNC), password=lambda: "x"),
            "pass engine= a function that creates the engine",
        ),
        (lambda: Database(SQLITE, password=lambda: "x"), "SQLite .* has no passwords"),
    ],
    ids=["str", "bytes", "not-callable", "async-on-sync", "ready-engine", "ready-sync", "sqlite"],
)
def test_a_password_that_cannot_work_is_refused_at_construction(
    make: Callable[[], object], fix: str
) -> None:
    with pytest.raises(ConfigurationError, match=fix) as raised:
        make()
    assert "hunter2" not in str(raised.value)


@pytest.mark.postgresql
@pytest.mark.parametrize(
    ("value", "what"), [(None, "returned NoneType"), (b"pw", "returned bytes"), ("", "empty str")]
)
async def test_a_provider_returning_no_str_is_a_configuration_error_at_connect(
    role: Role, value: object, what: str
) -> None:
    db = Database(role.with_driver("postgresql+asyncpg"), password=cast(Any, lambda: value))
    try:
        with pytest.raises(ConfigurationError, match=what):
            async with db.scope() as session:
                await session.execute(text("SELECT 1"))
    finally:
        await db.dispose()


@pytest.mark.postgresql
def test_a_sync_provider_returning_a_coroutine_to_a_sync_database_is_refused(
    role: Role,
) -> None:
    url = role.with_driver("postgresql+psycopg")
    db = SyncDatabase(url, password=cast(Any, lambda: async_provider()))
    try:
        with pytest.raises(ConfigurationError, match="returned an awaitable"), db.scope() as s:
            s.execute(text("SELECT 1"))
    finally:
        db.dispose()
    # No "coroutine was never awaited" warning (warnings are errors in this suite).


# -- the guide ---------------------------------------------------------------------------


def docs_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL)


@pytest.mark.postgresql
async def test_the_guide_examples_connect(role: Role, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Python block of docs/guides/credentials.md runs; a stand-in ``boto3`` (not installed)
    returns the role's password as the RDS token, and one for ``hvac``, Vault's client."""
    requested: list[dict[str, Any]] = []

    class RDSClient:
        def generate_db_auth_token(self, **kwargs: Any) -> str:
            requested.append(kwargs)
            return role.password

    boto3 = types.ModuleType("boto3")
    setattr(boto3, "client", lambda service, region_name=None: RDSClient())  # noqa: B010
    monkeypatch.setitem(sys.modules, "boto3", boto3)
    url = role.url.set(drivername="postgresql+asyncpg", password=None)
    monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))

    async def read_secret() -> dict[str, Any]:
        return {"password": role.password, "ttl": 3600}

    blocks = docs_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        namespace: dict[str, Any] = {"read_secret": read_secret}
        exec(compile(block, str(DOCS), "exec"), namespace)
        db = namespace["db"]
        try:
            async with db.scope() as session:
                assert await session.scalar(text("SELECT current_user")) == role.name
        finally:
            await db.dispose()
    assert requested
    assert requested[0]["DBUsername"] == role.name
