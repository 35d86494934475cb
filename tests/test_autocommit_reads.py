"""Reads without a transaction: ``autocommit_reads=`` routes and ``@read_only(autocommit=True)``.

Their statements run in autocommit: no ``BEGIN`` nor ``COMMIT``, one round trip each.
The round trips are counted by the delaying proxy (``benchmarks/proxy.py``) between the
app and PostgreSQL; that no transaction spans two statements is seen by the server
itself: ``now()`` is the start of the current transaction, the same for every statement
of one.  Writes are refused before they are sent: in autocommit a write that
reached the server would stay, so an empty ``items`` table proves it never did.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import (
    URL,
    String,
    delete,
    event,
    func,
    insert,
    inspect,
    literal_column,
    make_url,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from asgi_sqla import (
    ConfigurationError,
    Database,
    RollbackOnlyError,
    SQLAlchemyMiddleware,
    SyncDatabase,
    read_only,
)
from asgi_sqla.types import ASGIApp, Message, Receive, Scope, Send
from benchmarks.proxy import DelayingProxy

from _helpers import (
    call_http,
    checked_out,
    create_tables,
    eventually,
    items,
    keys,
    pg_backends,
    plain_response,
    sync_checked_out,
    sync_keys,
    wait_for_active_query,
)

pytestmark = pytest.mark.anyio


class Base(DeclarativeBase):
    pass


class Item(Base):
    """The ``items`` table of ``_helpers``, mapped for the ORM's writes."""

    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, pool_size=1, max_overflow=0)
    await create_tables(database)
    try:
        yield database
    finally:
        await database.dispose()


Work = Callable[[Database], Awaitable[object]]


def route_app(db: Database, work: Work) -> ASGIApp:
    """An app answering 200 with ``repr(await work(db))``, or 500 with the error's type."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            result = await work(db)
        except Exception as exc:
            await plain_response(send, 500, type(exc).__name__.encode())
            return
        await plain_response(send, 200, repr(result).encode())

    return app


async def two_reads(db: Database) -> object:
    """``(rows, whether the two statements ran in different transactions)``, on PostgreSQL."""
    statement = select(func.count(), func.now()).select_from(items)
    count, first = (await db.session.execute(statement)).one()
    return (count, first != (await db.session.execute(select(func.now()))).scalar_one())


async def count_rows(db: Database) -> object:
    return (await db.session.execute(select(func.count()).select_from(items))).scalar_one()


# -- the route's statements: no transaction --------------------------------------------------


async def test_each_statement_of_an_autocommit_route_is_its_own_transaction(
    postgresql_url: str,
) -> None:
    database = Database(postgresql_url)
    await create_tables(database)
    app = SQLAlchemyMiddleware(route_app(database, two_reads), database, autocommit_reads=["/feed"])
    try:
        feed, other = await call_http(app, "/feed"), await call_http(app, "/other")
    finally:
        await database.dispose()

    assert (feed.status, feed.body) == (200, b"(0, True)")
    # The same reads in a transaction: the second statement is not its first.
    assert (other.status, other.body) == (200, b"(0, False)")


def proxied(url: str, proxy: DelayingProxy) -> str:
    return make_url(url).set(host=proxy.host, port=proxy.port).render_as_string(hide_password=False)


@pytest.fixture
def proxy(postgres_database: URL) -> Iterator[DelayingProxy]:
    assert postgres_database.host is not None
    assert postgres_database.port is not None
    with DelayingProxy(postgres_database.host, postgres_database.port) as relay:
        yield relay


async def round_trips_per_request(app: ASGIApp, path: str, proxy: DelayingProxy) -> list[int]:
    """The round trips of three requests to ``path``, after two that warm the connection."""
    counts = []
    for attempt in range(5):
        proxy.reset()
        recorder = await call_http(app, path)
        assert recorder.status == 200, recorder.body
        if attempt >= 2:
            counts.append(proxy.round_trips)
    return counts


async def test_a_read_costs_one_round_trip_per_statement_and_no_begin_nor_commit(
    postgresql_url: str, proxy: DelayingProxy
) -> None:
    database = Database(proxied(postgresql_url, proxy), pool_size=1, max_overflow=0)
    await create_tables(database)

    async def one_read(db: Database) -> object:
        return (await db.session.execute(select(items.c.key))).all()

    app = SQLAlchemyMiddleware(
        route_app(database, one_read), database, autocommit_reads=["/feed"], read_only=["/ro"]
    )
    try:
        feed = await round_trips_per_request(app, "/feed", proxy)
        in_transaction = await round_trips_per_request(app, "/ro", proxy)
        feed_again = await round_trips_per_request(app, "/feed", proxy)
    finally:
        await database.dispose()

    assert feed == feed_again == [1, 1, 1]
    # BEGIN (with SET TRANSACTION READ ONLY on asyncpg's first statement or its own),
    # the SELECT, the ROLLBACK: the route without autocommit.
    assert min(in_transaction) >= 3, in_transaction


async def test_the_next_request_on_the_connection_runs_in_a_transaction_at_its_isolation_level(
    postgresql_url: str,
) -> None:
    # REPEATABLE READ set on the engine: what the pool must put back after AUTOCOMMIT.
    database = Database(
        postgresql_url, pool_size=1, max_overflow=0, isolation_level="REPEATABLE READ"
    )
    await create_tables(database)

    async def isolation(db: Database) -> object:
        level, first = (
            await db.session.execute(
                select(func.current_setting("transaction_isolation"), func.now())
            )
        ).one()
        return (level, first != (await db.session.execute(select(func.now()))).scalar_one())

    app = SQLAlchemyMiddleware(route_app(database, isolation), database, autocommit_reads=["/feed"])
    try:
        answers = [(await call_http(app, path)).body for path in ("/feed", "/orders", "/feed")]
    finally:
        await database.dispose()

    # In autocommit each statement has the server's default level (read committed).
    assert answers == [
        b"('read committed', True)",
        b"('repeatable read', False)",
        b"('read committed', True)",
    ]


async def test_each_statement_sees_its_own_snapshot(postgresql_url: str) -> None:
    """What autocommit gives up: under REPEATABLE READ a transaction's reads agree; here not."""
    database = Database(postgresql_url, isolation_level="REPEATABLE READ")
    await create_tables(database)
    between = anyio.Event()
    committed = anyio.Event()

    async def read_twice(db: Database) -> object:
        before = (await db.session.execute(select(func.count()).select_from(items))).scalar_one()
        between.set()
        await committed.wait()
        after = (await db.session.execute(select(func.count()).select_from(items))).scalar_one()
        return (before, after)

    async def commit_a_row_between(path: str) -> bytes:
        nonlocal between, committed
        between, committed = anyio.Event(), anyio.Event()
        result: list[bytes] = []

        async def request() -> None:
            result.append((await call_http(app, path)).body)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(request)
            await between.wait()
            async with database.engine.begin() as connection:
                await connection.execute(insert(items).values(key=path))
            committed.set()
        return result[0]

    app = SQLAlchemyMiddleware(
        route_app(database, read_twice), database, autocommit_reads=["/feed"], read_only=["/ro"]
    )
    try:
        in_transaction = await commit_a_row_between("/ro")
        in_autocommit = await commit_a_row_between("/feed")
    finally:
        await database.dispose()

    assert in_transaction == b"(0, 0)"  # one snapshot for the transaction
    assert in_autocommit == b"(1, 2)"  # the second statement saw the commit


# -- writes are refused before they are sent --------------------------------------------------


async def orm_add(db: Database) -> object:
    db.session.add(Item(key="orm"))
    return await db.session.execute(select(items.c.key))  # autoflush


async def orm_flush(db: Database) -> object:
    db.session.add(Item(key="flushed"))
    await db.session.flush()
    return None


async def orm_change(db: Database) -> object:
    async with db.engine.begin() as connection:  # a row to change, committed beforehand
        await connection.execute(insert(items).values(key="before"))
    item = (await db.session.execute(select(Item))).scalar_one()
    item.key = "changed"
    await db.session.flush()
    return None


async def core_insert(db: Database) -> object:
    return await db.session.execute(insert(items).values(key="core"))


async def core_update(db: Database) -> object:
    return await db.session.execute(update(items).values(key="core"))


async def core_delete(db: Database) -> object:
    return await db.session.execute(delete(items))


async def text_insert(db: Database) -> object:
    return await db.session.execute(text("INSERT INTO items (key) VALUES ('text')"))


async def text_lowercase_insert(db: Database) -> object:
    return await db.session.execute(text("  insert into items (key) values ('lower')"))


async def text_two_statements(db: Database) -> object:
    return await db.session.execute(text("SELECT 1; DROP TABLE items"))


async def compiled_two_statements(db: Database) -> object:
    return await db.session.execute(select(literal_column("1; DROP TABLE items")))


async def text_cte_insert(db: Database) -> object:
    statement = "WITH added AS (INSERT INTO items (key) VALUES ('cte') RETURNING id) SELECT 1"
    return await db.session.execute(text(statement))


async def compiled_cte_insert(db: Database) -> object:
    added = insert(items).values(key="cte").returning(items.c.id).cte("added")
    return await db.session.execute(select(added.c.id))


async def select_for_update(db: Database) -> object:
    return await db.session.execute(select(items).with_for_update())


async def text_select_for_update(db: Database) -> object:
    return await db.session.execute(text("SELECT * FROM items FOR NO KEY UPDATE"))


async def select_into(db: Database) -> object:
    return await db.session.execute(text("SELECT * INTO copied FROM items"))


async def create_table(db: Database) -> object:
    return await db.session.execute(text("CREATE TABLE made (id INTEGER)"))


async def set_setting(db: Database) -> object:
    return await db.session.execute(text("SET search_path TO nowhere"))


async def driver_sql(db: Database) -> object:
    connection = await db.session.connection()
    return await connection.exec_driver_sql("INSERT INTO items (key) VALUES ('driver')")


async def run_sync_insert(db: Database) -> object:
    return await db.session.run_sync(
        lambda session: session.execute(insert(items).values(key="sync"))
    )


async def commit(db: Database) -> object:
    await db.session.execute(select(items.c.key))
    await db.session.commit()
    return None


async def begin_block(db: Database) -> object:
    async with db.session.begin():
        await db.session.execute(select(items.c.key))
    return None


async def savepoint(db: Database) -> object:
    await db.session.execute(select(items.c.key))
    async with db.session.begin_nested():  # SAVEPOINT is sent with the next statement
        await db.session.execute(select(items.c.key))
    return None


WRITES = [
    orm_add,
    orm_flush,
    orm_change,
    core_insert,
    core_update,
    core_delete,
    text_insert,
    text_lowercase_insert,
    text_two_statements,
    compiled_two_statements,
    text_cte_insert,
    compiled_cte_insert,
    select_for_update,
    text_select_for_update,
    select_into,
    create_table,
    set_setting,
    driver_sql,
    run_sync_insert,
    commit,
    begin_block,
    savepoint,
]


async def test_every_write_is_refused_before_it_is_sent(db: Database) -> None:
    # One database for all the writes, each its own request: a write that got through
    # would stay (autocommit), and show in the checks below whichever it was.
    refusals = {}
    for write in WRITES:
        app = SQLAlchemyMiddleware(route_app(db, write), db, autocommit_reads=["/feed"])
        refused = await call_http(app, "/feed")
        refusals[write.__name__] = (refused.status, refused.body)
    after = await call_http(
        SQLAlchemyMiddleware(route_app(db, settings), db, autocommit_reads=["/feed"]), "/feed"
    )

    assert refusals == {write.__name__: (500, b"RollbackOnlyError") for write in WRITES}
    assert await keys(db) == {"before"}  # orm_change's own row, committed by the test
    # The next request on the connection (the pool's only one) has the server's setting.
    assert (after.status, after.body) in [(200, b"None"), (200, b"'\"$user\", public'")]
    async with db.engine.connect() as connection:
        tables = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    assert tables == ["items"]
    assert checked_out(db) == 0


async def settings(db: Database) -> object:
    if db.engine.dialect.name == "sqlite":
        return None
    return (await db.session.execute(text("SHOW search_path"))).scalar_one()


async def test_a_refused_write_names_the_statement_and_what_to_do(db: Database) -> None:
    errors: list[BaseException] = []

    async def write(db: Database) -> object:
        for attempt in (core_insert, orm_flush):
            try:
                await attempt(db)
            except RollbackOnlyError as exc:
                errors.append(exc)
                await db.session.rollback()
        return None

    await call_http(SQLAlchemyMiddleware(route_app(db, write), db, autocommit_reads=["/"]))

    insert_refused, flush_refused = map(str, errors)
    assert "an INSERT statement was refused before it was sent" in insert_refused
    assert "Write in a route that is neither read-only nor in autocommit_reads" in insert_refused
    assert "'core'" not in insert_refused  # never a value
    # Pending ORM changes are refused at the flush, before any statement is made.
    assert "flushing the session's pending changes was refused" in flush_refused


async def test_reads_of_every_kind_pass(db: Database) -> None:
    async def reads(db: Database) -> object:
        session = db.session
        await session.execute(select(items.c.key).where(items.c.key == "update"))
        await session.execute(text("select 1"))
        await session.execute(text("WITH n AS (SELECT 1 AS x) SELECT x FROM n"))
        await session.execute(text("VALUES (1)"))
        await session.get(Item, 1)
        connection = await session.connection()
        return (await connection.exec_driver_sql("SELECT 2")).scalar_one()

    recorder = await call_http(
        SQLAlchemyMiddleware(route_app(db, reads), db, autocommit_reads=["/"])
    )

    assert (recorder.status, recorder.body) == (200, b"2")


async def test_a_server_side_cursor_is_refused_with_what_to_do_instead(db: Database) -> None:
    errors: list[BaseException] = []

    async def stream(db: Database) -> object:
        try:
            return [row async for row in await db.session.stream(select(items.c.key))]
        except ConfigurationError as exc:
            errors.append(exc)
            raise

    recorder = await call_http(
        SQLAlchemyMiddleware(route_app(db, stream), db, autocommit_reads=["/"])
    )

    assert recorder.body == b"ConfigurationError"
    assert "use session.execute(), or give the route to read_only=" in str(errors[0])
    assert checked_out(db) == 0


# -- the rest of the app ----------------------------------------------------------------------


async def test_writes_of_other_routes_commit_beside_autocommit_reads(db: Database) -> None:
    async def write_or_read(db: Database) -> object:
        context_path = current_path.get()
        if context_path.startswith("/orders"):
            await db.session.execute(insert(items).values(key=context_path))
            return None
        return (await db.session.execute(select(func.count()).select_from(items))).scalar_one()

    inner = route_app(db, write_or_read)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        token = current_path.set(scope["path"])
        try:
            await inner(scope, receive, send)
        finally:
            current_path.reset(token)

    middleware = SQLAlchemyMiddleware(app, db, autocommit_reads=["/feed"])
    paths = [f"/orders/{n}" if n % 2 else "/feed" for n in range(20)]
    statuses: list[int] = []

    async def request(path: str) -> None:
        statuses.append((await call_http(middleware, path)).status)

    async with anyio.create_task_group() as tasks:
        for path in paths:
            tasks.start_soon(request, path)

    assert statuses == [200] * 20
    assert await keys(db) == {p for p in paths if p.startswith("/orders")}
    feed = await call_http(middleware, "/feed")
    assert feed.body == b"10"
    assert checked_out(db) == 0


current_path: contextvars.ContextVar[str] = contextvars.ContextVar("current_path")


async def test_a_decorated_handler_reads_in_autocommit(postgresql_url: str) -> None:
    database = Database(postgresql_url)
    await create_tables(database)

    @read_only(autocommit=True)
    async def handler() -> object:
        return await two_reads(database)

    @read_only
    async def in_transaction() -> object:
        return await two_reads(database)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        result = await (handler() if scope["path"] == "/feed" else in_transaction())
        await plain_response(send, 200, repr(result).encode())

    middleware = SQLAlchemyMiddleware(app, database)
    try:
        bodies = [(await call_http(middleware, path)).body for path in ("/feed", "/ro")]
    finally:
        await database.dispose()

    assert bodies == [b"(0, True)", b"(0, False)"]


def test_read_only_takes_a_bool_for_autocommit() -> None:
    with pytest.raises(ConfigurationError, match=r"autocommit must be True or False"):
        read_only(autocommit="yes")  # type: ignore[call-overload]


async def test_a_request_without_a_path_is_read_only_in_a_transaction(
    postgresql_url: str,
) -> None:
    database = Database(postgresql_url)
    await create_tables(database)
    app = SQLAlchemyMiddleware(route_app(database, two_reads), database, autocommit_reads=["/"])
    recorder = ASGIRecorderWithoutPath()
    try:
        await recorder(app)
    finally:
        await database.dispose()

    assert recorder.body == b"(0, False)"


class ASGIRecorderWithoutPath:
    """One GET request whose scope has no ``path`` (a middleware in front dropped it)."""

    body = b""

    async def __call__(self, app: ASGIApp) -> None:
        scope: Scope = {"type": "http", "method": "GET", "headers": [], "http_version": "1.1"}
        sent: list[bytes] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body":
                sent.append(message.get("body", b""))

        await app(scope, receive, send)
        self.body = b"".join(sent)


# -- nothing leaks ----------------------------------------------------------------------------


async def test_a_cancelled_statement_leaves_no_connection_and_no_state(
    postgresql_url: str, pg_admin: Any
) -> None:
    database = Database(postgresql_url, pool_size=1, max_overflow=0)
    await create_tables(database)

    async def sleeper(db: Database) -> object:
        return await db.session.execute(text("SELECT pg_sleep(30)"))

    app = SQLAlchemyMiddleware(route_app(database, sleeper), database, autocommit_reads=["/feed"])
    try:
        async with anyio.create_task_group() as tasks:
            scope = anyio.CancelScope()

            async def request() -> None:
                with scope:
                    await call_http(app, "/feed")

            tasks.start_soon(request)
            await wait_for_active_query(pg_admin, "SELECT pg_sleep(30)")
            scope.cancel()
        assert eventually(lambda: checked_out(database) == 0)
        assert eventually(
            lambda: not [b for b in pg_backends(pg_admin) if "pg_sleep" in (b[1] or "")]
        )
        after = await call_http(
            SQLAlchemyMiddleware(route_app(database, two_reads), database), "/orders"
        )
    finally:
        await database.dispose()

    assert (after.status, after.body) == (200, b"(0, False)")


async def test_an_exception_after_a_read_gives_the_connection_back(db: Database) -> None:
    async def failing(db: Database) -> object:
        await db.session.execute(select(items.c.key))
        raise ValueError("the handler failed")

    recorder = await call_http(
        SQLAlchemyMiddleware(route_app(db, failing), db, autocommit_reads=["/"])
    )

    assert (recorder.status, recorder.body) == (500, b"ValueError")
    assert checked_out(db) == 0


async def test_a_failed_statement_leaves_the_connection_usable(db: Database) -> None:
    async def failing(db: Database) -> object:
        with contextlib.suppress(DBAPIError):
            await db.session.execute(text("SELECT * FROM no_such_table"))
        return await count_rows(db)

    recorder = await call_http(
        SQLAlchemyMiddleware(route_app(db, failing), db, autocommit_reads=["/"])
    )

    # No transaction was aborted: the next statement of the same session runs.
    assert (recorder.status, recorder.body) == (200, b"0")
    assert checked_out(db) == 0


# -- SyncDatabase -----------------------------------------------------------------------------


@pytest.fixture
def sync_db(sync_database_url: str) -> Iterator[SyncDatabase]:
    database = SyncDatabase(sync_database_url, pool_size=1, max_overflow=0)
    with database.engine.begin() as connection:
        items.metadata.create_all(connection)
    try:
        yield database
    finally:
        database.dispose()


def sync_app(db: SyncDatabase, work: Callable[[Session], object]) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            result = await anyio.to_thread.run_sync(lambda: work(db.session))
        except Exception as exc:
            await plain_response(send, 500, type(exc).__name__.encode())
            return
        await plain_response(send, 200, repr(result).encode())

    return app


async def test_a_sync_database_reads_in_autocommit_and_refuses_writes(
    sync_db: SyncDatabase,
) -> None:
    postgresql = sync_db.engine.dialect.name == "postgresql"

    def reads(session: Session) -> object:
        session.execute(select(items.c.key))
        if not postgresql:
            return session.connection().connection.driver_connection.in_transaction  # type: ignore[union-attr]
        first = session.execute(select(func.now())).scalar_one()
        return first != session.execute(select(func.now())).scalar_one()

    def write(session: Session) -> object:
        session.add(Item(key="sync"))
        session.flush()
        return None

    def raw_write(session: Session) -> object:
        return session.connection().exec_driver_sql("INSERT INTO items (key) VALUES ('raw')")

    def add(session: Session) -> object:
        session.execute(insert(items).values(key="committed"))
        return None

    def two_statements(session: Session) -> object:
        # psycopg 2 sends the string whole (the simple query protocol), so the server
        # would drop the table; sqlite3 would refuse it, as would psycopg 3.
        return session.execute(text("SELECT 1; DROP TABLE items"))

    routes = {
        "/orders": add,
        "/feed": reads,
        "/feed/write": write,
        "/feed/raw": raw_write,
        "/feed/two": two_statements,
    }

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await sync_app(sync_db, routes[scope["path"]])(scope, receive, send)

    middleware = SQLAlchemyMiddleware(app, sync_db, autocommit_reads=["/feed", "/feed/*"])
    answers = [
        (r.status, r.body)
        for r in [await call_http(middleware, path) for path in (*routes, "/feed")]
    ]

    read = b"True" if postgresql else b"False"  # SQLite: no transaction open after the read
    assert answers == [
        (200, b"None"),
        (200, read),
        (500, b"RollbackOnlyError"),
        (500, b"RollbackOnlyError"),
        (500, b"RollbackOnlyError"),
        (200, read),
    ]
    assert sync_keys(sync_db) == {"committed"}
    assert sync_checked_out(sync_db) == 0


async def test_a_sync_read_costs_one_round_trip_on_psycopg(
    sync_postgresql_url: str, proxy: DelayingProxy
) -> None:
    database = SyncDatabase(proxied(sync_postgresql_url, proxy), pool_size=1, max_overflow=0)
    app = SQLAlchemyMiddleware(
        sync_app(database, lambda session: session.execute(text("SELECT 1")).scalar_one()),
        database,
        autocommit_reads=["/feed"],
    )
    try:
        counts = await round_trips_per_request(app, "/feed", proxy)
        normal = await round_trips_per_request(app, "/orders", proxy)
    finally:
        database.dispose()

    if database.engine.dialect.driver == "psycopg2":
        # psycopg 2 sends SET default_transaction_isolation TO DEFAULT on entering
        # autocommit once the pool has reset the level (docs/autocommit-reads.md).
        assert counts == [2, 2, 2]
    else:
        assert counts == [1, 1, 1]
    assert normal == [3, 3, 3]


# -- the pytest plugin ------------------------------------------------------------------------


async def test_under_a_tests_transaction_the_route_keeps_a_read_only_transaction(
    db: Database,
) -> None:
    from asgi_sqla.pytest_plugin import rolled_back

    async with rolled_back(db):
        app = SQLAlchemyMiddleware(route_app(db, count_rows), db, autocommit_reads=["/"])
        recorder = await call_http(app)
        refused = await call_http(
            SQLAlchemyMiddleware(route_app(db, commit), db, autocommit_reads=["/"])
        )

    assert recorder.status == 200
    assert refused.body == b"RollbackOnlyError"


# -- the guide --------------------------------------------------------------------------------

GUIDE = Path(__file__).resolve().parent.parent / "docs/guides/autocommit-reads.md"


async def test_the_guides_app_reads_in_autocommit(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    assert [block.splitlines()[0] for block in blocks] == ["# feed_app.py"]
    monkeypatch.setenv("DATABASE_URL", database_url)
    module = types.ModuleType("feed_app")
    exec(compile(blocks[0], "docs/feed_app.py", "exec"), module.__dict__)
    db: Database = module.db
    async with db.engine.begin() as connection:
        await connection.execute(text("CREATE TABLE articles (id INTEGER PRIMARY KEY, title TEXT)"))
        await connection.execute(text("INSERT INTO articles VALUES (1, 'First')"))
    seen: list[bool] = []

    @event.listens_for(db.engine.sync_engine, "before_cursor_execute")
    def note_autocommit(conn: Any, *args: Any) -> None:
        seen.append(conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT")

    try:
        answers = [await call_http(module.app, path) for path in ("/feed", "/articles/1")]
    finally:
        await db.dispose()

    assert [(a.status, json.loads(a.body)) for a in answers] == [
        (200, [{"id": 1, "title": "First"}]),
        (200, {"title": "First"}),
    ]
    assert seen == [True, True]


async def test_a_two_phase_middleware_reads_in_autocommit_too(postgresql_url: str) -> None:
    database = Database(postgresql_url)
    await create_tables(database)
    app = SQLAlchemyMiddleware(
        route_app(database, two_reads), database, autocommit_reads=["/feed"], two_phase=True
    )
    try:
        async with database.engine.connect():  # startup's check of max_prepared_transactions
            pass
        answers = [(await call_http(app, path)).body for path in ("/feed", "/other")]
    finally:
        await database.dispose()

    assert answers == [b"(0, True)", b"(0, False)"]
    assert checked_out(database) == 0
