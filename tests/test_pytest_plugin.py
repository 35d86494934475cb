"""The pytest plugin: user test files run in transactions that leave nothing behind.

The first half runs small user test files (and the example test files in
``examples/``) with ``pytester``, then checks on a new connection that no row
persisted.  The second half tests the plugin's machinery directly through
``rolled_back()``: sessions taking turns on the shared connection, nesting, lifespan,
PostgreSQL's deferred constraints, read-only routes, two-phase commits.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import URL, event, insert, select, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_sqla import AsgiSqlaError, ConfigurationError, Database, SQLAlchemyMiddleware
from asgi_sqla.pytest_plugin import ConnectionTurnTimeout, rolled_back

import _postgres
from _helpers import (
    create_tables,
    items,
    keys,
    open_database,
    open_sync_database,
    orphan_child,
    query,
    started_engine,
    sync_keys,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GUIDE = Path(__file__).resolve().parent.parent / "docs/guides/testing.md"

# Loaded here, so that the in-process pytester runs find them loaded and do not import
# them again: after each run pytester unloads what it imported, and a second import
# makes SQLAlchemy's dialects register their SQL functions twice (a warning) and
# crashes asyncpg's compiled modules.
for _module in (
    "fastapi",
    "litestar",
    "asgi_lifespan",
    "httpx_ws.transport",
    "aiosqlite",
    "asyncpg",
    "psycopg",
    "sqlalchemy.dialects.sqlite.aiosqlite",
    "sqlalchemy.dialects.postgresql.asyncpg",
    "sqlalchemy.dialects.postgresql.psycopg",
):
    __import__(_module)

# -- user test files, run with pytester ---------------------------------------------------

INNER_INI = """\
[pytest]
addopts = -p no:cacheprovider
filterwarnings = error
"""

#: A small app, as a user would have it: one database, HTTP, websocket, lifespan.
USER_APP = """
import os
from contextlib import asynccontextmanager

import anyio.lowlevel
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocketDisconnect

from asgi_sqla import Database, SQLAlchemyMiddleware

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(64), nullable=False, unique=True),
)
db = Database(os.environ["DATABASE_URL"])


async def add_item(key):
    await db.session.execute(insert(items).values(key=key))


async def item_keys():
    return list(await db.session.scalars(select(items.c.key).order_by(items.c.key)))


async def create(request):
    key = request.path_params["key"]
    await add_item(key)
    await anyio.lowlevel.checkpoint()  # concurrent requests run here
    return PlainTextResponse(key, status_code=400 if key.startswith("bad") else 201)


async def listing(request):
    return JSONResponse(await item_keys())


async def socket(websocket):
    await websocket.accept()
    try:
        while True:
            await add_item(await websocket.receive_text())
            await websocket.send_json(await item_keys())
    except WebSocketDisconnect:
        pass


@asynccontextmanager
async def lifespan(app):
    async with db.scope():
        await add_item("added at startup")
    yield


app = SQLAlchemyMiddleware(
    Starlette(
        routes=[
            Route("/items/{key}", create, methods=["POST"]),
            Route("/items", listing),
            WebSocketRoute("/ws", socket),
        ],
        lifespan=lifespan,
    ),
    db,
)
"""

USER_CONFTEST = """
import pytest

from user_app import db


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def asgi_sqla_databases():
    return [db]
"""

USER_TESTS = """
import asyncio

import httpx
import pytest
from asgi_lifespan import LifespanManager
from httpx_ws import aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport

from user_app import add_item, app, db, item_keys

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("asgi_sqla_transaction")]


@pytest.fixture
async def client():
    transport = ASGIWebSocketTransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def listed(client):
    return (await client.get("/items")).json()


async def test_a_commit_is_seen_by_the_next_request(client):
    assert (await client.post("/items/a")).status_code == 201
    assert await listed(client) == ["a"]


async def test_the_previous_test_left_nothing(client):
    assert await listed(client) == []


async def test_a_4xx_rolls_back_within_the_test(client):
    assert (await client.post("/items/bad")).status_code == 400
    assert (await client.post("/items/b")).status_code == 201
    assert await listed(client) == ["b"]


async def test_the_lifespan_runs_inside_the_transaction(client):
    async with LifespanManager(app):
        assert await listed(client) == ["added at startup"]
        await client.post("/items/c")
    assert await listed(client) == ["added at startup", "c"]


async def test_a_service_function_runs_inside_db_scope():
    async with db.scope():
        await add_item("s")
    with pytest.raises(LookupError):
        async with db.scope():
            await add_item("undone")
            raise LookupError
    async with db.scope():
        assert await item_keys() == ["s"]


async def test_a_websocket_commits_each_message(client):
    async with aconnect_ws("/ws", client) as websocket:
        await websocket.send_text("w1")
        assert await websocket.receive_json() == ["w1"]
        await websocket.send_text("w2")
        assert await websocket.receive_json() == ["w1", "w2"]
    assert await listed(client) == ["w1", "w2"]


async def test_concurrent_requests_keep_their_own_outcome(client):
    responses = await asyncio.gather(
        *(client.post(f"/items/{prefix}{i}") for i in range(6) for prefix in ("k", "bad"))
    )
    assert sorted(r.status_code for r in responses) == [201] * 6 + [400] * 6
    assert await listed(client) == [f"k{i}" for i in range(6)]
"""

#: Two databases in one app; requests use them in both orders.
TWO_DATABASES_APP = """
import os

import anyio.lowlevel
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from asgi_sqla import Database, SQLAlchemyMiddleware

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(64), nullable=False, unique=True),
)
first = Database(os.environ["FIRST_DATABASE_URL"])
second = Database(os.environ["SECOND_DATABASE_URL"])


async def create(request):
    key = request.path_params["key"]
    order = (first, second) if key.endswith("12") else (second, first)
    for db in order:
        await db.session.execute(insert(items).values(key=key))
        await anyio.lowlevel.checkpoint()
    return PlainTextResponse(key, status_code=400 if key.startswith("bad") else 201)


async def listing(request):
    return JSONResponse(
        [list(await db.session.scalars(select(items.c.key).order_by(items.c.key)))
         for db in (first, second)]
    )


app = SQLAlchemyMiddleware(
    Starlette(routes=[Route("/items/{key}", create, methods=["POST"]), Route("/items", listing)]),
    first,
    second,
)
"""

TWO_DATABASES_TESTS = """
import asyncio

import httpx
import pytest

from two_app import app, first, second

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def asgi_sqla_databases():
    return [first, second]


async def test_requests_commit_and_roll_back_on_both_databases(asgi_sqla_transaction):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        responses = await asyncio.gather(
            *(client.post(f"/items/{p}{i}-{order}")
              for i in range(3) for p in ("k", "bad") for order in ("12", "21"))
        )
        assert sorted(r.status_code for r in responses) == [201] * 6 + [400] * 6
        expected = sorted(f"k{i}-{order}" for i in range(3) for order in ("12", "21"))
        assert (await client.get("/items")).json() == [expected, expected]
    assert asgi_sqla_transaction.databases == (first, second)
"""


@pytest.fixture
def user_files(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".ini", pytest=INNER_INI)
    pytester.makepyfile(user_app=USER_APP, conftest=USER_CONFTEST)
    pytester.syspathinsert()
    return pytester


def create_items(url: str) -> None:
    """Create the ``items`` table, committed, in the database of the async ``url``."""

    async def create() -> None:
        db = Database(url)
        try:
            await create_tables(db)
        finally:
            await db.dispose()

    asyncio.run(create())


def committed(url: str) -> list[str]:
    """The committed ``items.key`` values, read on a new connection."""
    return sorted(row[0] for row in query(url, "SELECT key FROM items"))


def test_a_user_test_file_runs_each_test_in_a_transaction_that_leaves_nothing(
    user_files: pytest.Pytester, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_items(database_url)
    monkeypatch.setenv("DATABASE_URL", database_url)
    user_files.makepyfile(test_user=USER_TESTS)

    result = user_files.runpytest()

    result.assert_outcomes(passed=7)
    assert committed(database_url) == []


def test_without_the_fixture_the_same_tests_leave_their_rows(
    user_files: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The plugin is inert unless a test asks for it, and the check above can fail.
    url = f"sqlite+aiosqlite:///{tmp_path / 'plain.db'}"
    create_items(url)
    monkeypatch.setenv("DATABASE_URL", url)
    user_files.makepyfile(
        test_user=USER_TESTS.replace(', pytest.mark.usefixtures("asgi_sqla_transaction")', "")
    )

    result = user_files.runpytest(
        "-k", "a_commit_is_seen or previous_test_left_nothing or a_4xx_rolls_back"
    )

    # Each test sees the rows of the tests before it.
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "FAILED *test_the_previous_test_left_nothing*",
            "FAILED *test_a_4xx_rolls_back_within_the_test*",
        ]
    )
    assert committed(url) == ["a", "b"]


@pytest.mark.postgresql
def test_two_databases_are_rolled_back_together(
    pytester: pytest.Pytester,
    postgres_database: URL,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first_url = f"sqlite+aiosqlite:///{tmp_path / 'first.db'}"
    second_url = postgres_database.set(drivername="postgresql+asyncpg").render_as_string(
        hide_password=False
    )
    for url in (first_url, second_url):
        create_items(url)
    monkeypatch.setenv("FIRST_DATABASE_URL", first_url)
    monkeypatch.setenv("SECOND_DATABASE_URL", second_url)
    pytester.makefile(".ini", pytest=INNER_INI)
    pytester.makepyfile(two_app=TWO_DATABASES_APP, test_two=TWO_DATABASES_TESTS)
    pytester.syspathinsert()

    result = pytester.runpytest()

    result.assert_outcomes(passed=1)
    assert committed(first_url) == committed(second_url) == []


def test_a_test_without_asgi_sqla_databases_is_told_to_define_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makefile(".ini", pytest=INNER_INI)
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        @pytest.mark.anyio
        async def test_it(asgi_sqla_transaction):
            pass
        """
    )

    result = pytester.runpytest()

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*define a fixture named asgi_sqla_databases*"])


def test_a_test_on_trio_is_told_to_run_on_asyncio(
    user_files: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'trio.db'}")
    user_files.makepyfile(
        test_trio="""
        import pytest

        @pytest.fixture
        def anyio_backend():
            return "trio"

        @pytest.mark.anyio
        async def test_it(asgi_sqla_transaction):
            pass
        """
    )

    result = user_files.runpytest()

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*runs on asyncio*Define a fixture `anyio_backend`*"])


@pytest.fixture(params=["sqlite", pytest.param("asyncpg", marks=pytest.mark.postgresql)])
def example_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database for an example app: a SQLite file, or PostgreSQL through asyncpg."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'example.db'}"
    database: URL = request.getfixturevalue("postgres_database")
    return database.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


@pytest.mark.parametrize("framework", ["fastapi", "litestar"])
def test_the_example_test_files_pass_and_leave_no_rows(
    pytester: pytest.Pytester,
    example_database_url: str,
    framework: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The examples' tests run on the database this names (examples/conftest.py).
    monkeypatch.setenv("EXAMPLES_DATABASE_URL", example_database_url)
    pytester.makefile(".ini", pytest=INNER_INI)

    result = pytester.runpytest(
        str(EXAMPLES / f"test_{framework}_app.py"),
        "-c",
        str(pytester.path / "pytest.ini"),
        "--rootdir",
        str(pytester.path),
    )

    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == outcomes.get("errors", 0) == 0, result.stdout.str()
    assert outcomes["passed"] >= 9
    # The one skipped test needs PostgreSQL's deferred constraints.
    assert outcomes.get("skipped", 0) == (1 if example_database_url.startswith("sqlite") else 0)
    assert query(example_database_url, "SELECT count(*) FROM notes") == [(0,)]
    assert query(example_database_url, "SELECT count(*) FROM events") == [(0,)]


def code_files(markdown: Path) -> dict[str, str]:
    """The code blocks of ``markdown`` whose first line names a file (``# name.py``)."""
    files: dict[str, str] = {}
    for block in re.findall(r"```python\n(.*?)```", markdown.read_text(), re.DOTALL):
        first_line = block.splitlines()[0]
        if re.fullmatch(r"# \w+\.py", first_line):
            files[first_line[2:-3]] = block
    return files


def test_the_testing_guide_examples_pass_and_leave_no_rows(
    pytester: pytest.Pytester, example_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = code_files(GUIDE)
    assert sorted(files) == ["conftest", "myapp", "test_own_fixture", "test_users"]
    monkeypatch.setenv("DATABASE_URL", example_database_url)
    pytester.makefile(".ini", pytest=INNER_INI)
    pytester.makepyfile(**files)
    pytester.syspathinsert()

    result = pytester.runpytest()

    result.assert_outcomes(passed=6)
    assert query(example_database_url, "SELECT count(*) FROM users") == [(0,)]


# -- the machinery, through rolled_back() -------------------------------------------------


def items_app(db: Database, **options: Any) -> SQLAlchemyMiddleware:
    """POST /items/{key} inserts (400 for keys starting with "bad"), GET /items lists."""

    async def create(request: Request) -> Response:
        key = request.path_params["key"]
        await db.session.execute(insert(items).values(key=key))
        await anyio.lowlevel.checkpoint()  # concurrent requests run here
        return PlainTextResponse(key, status_code=400 if key.startswith("bad") else 201)

    async def listing(request: Request) -> Response:
        rows = await db.session.scalars(select(items.c.key).order_by(items.c.key))
        return JSONResponse(list(rows))

    routes = [Route("/items/{key}", create, methods=["POST"]), Route("/items", listing)]
    return SQLAlchemyMiddleware(Starlette(routes=routes), db, **options)


def client_of(app: Any, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def listed(client: httpx.AsyncClient) -> list[str]:
    response = await client.get("/items")
    assert response.status_code == 200
    items_listed: list[str] = response.json()
    return items_listed


@pytest.fixture
def statements(db: Database) -> Iterator[list[str]]:
    """The statements sent to ``db`` (savepoints and writes), in order."""
    sent: list[str] = []

    def before_cursor_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "asgi_sqla_check" not in statement:
            sent.append(statement.split("(")[0].strip())

    engine = db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", before_cursor_execute)
    yield sent
    event.remove(engine, "before_cursor_execute", before_cursor_execute)


@pytest.mark.anyio
async def test_concurrent_requests_take_turns_on_the_connection(
    db: Database, statements: list[str]
) -> None:
    async with rolled_back(db), client_of(items_app(db)) as client:
        responses = await asyncio.gather(
            *(client.post(f"/items/{prefix}{i}") for i in range(5) for prefix in ("k", "bad"))
        )
        kinds = ("SAVEPOINT sa_", "INSERT", "RELEASE SAVEPOINT sa_", "ROLLBACK TO SAVEPOINT sa_")
        writes = [s for s in statements if s.startswith(kinds)]

        assert sorted(r.status_code for r in responses) == [201] * 5 + [400] * 5
        assert await listed(client) == [f"k{i}" for i in range(5)]
    # Each request's savepoint ended before the next one began: never two open at once.
    assert len(writes) == 30
    for begin, write, end in zip(writes[::3], writes[1::3], writes[2::3], strict=True):
        assert begin.startswith("SAVEPOINT"), writes
        assert write.startswith("INSERT INTO items"), writes
        assert end.startswith(("RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT")), writes
    assert await keys(db) == set()


@pytest.mark.anyio
async def test_sessions_opened_inside_a_request_use_the_connection_without_waiting(
    db: Database,
) -> None:
    async def handler(request: Request) -> Response:
        await db.session.execute(insert(items).values(key="request"))
        async with db.new_session() as audit:  # nested in the same task
            await audit.execute(insert(items).values(key="audit"))

        async def child(key: str) -> None:
            async with db.new_session() as session, session.begin():
                session.add_all([])  # a begin() block whose commit flushes nothing
                await session.execute(insert(items).values(key=key))

        await asyncio.gather(child("child 1"), child("child 2"))  # tasks it starts
        return PlainTextResponse("ok", status_code=201)

    app = SQLAlchemyMiddleware(Starlette(routes=[Route("/", handler, methods=["POST"])]), db)
    async with rolled_back(db) as outer, client_of(app) as client:
        with anyio.fail_after(5):
            assert (await client.post("/")).status_code == 201
        rows = await outer.connection(db).execute(select(items.c.key))

        assert sorted(rows.scalars()) == ["audit", "child 1", "child 2", "request"]
    assert await keys(db) == set()


@pytest.mark.anyio
async def test_a_request_sent_from_inside_a_scope_nests_in_it(db: Database) -> None:
    async with rolled_back(db), client_of(items_app(db)) as client:
        async with db.scope() as session:
            await session.execute(insert(items).values(key="from the test"))
            assert (await client.post("/items/from-the-app")).status_code == 201
        assert await listed(client) == ["from the test", "from-the-app"]


@pytest.mark.anyio
async def test_a_session_first_used_inside_a_later_session_is_refused_clearly(
    db: Database,
) -> None:
    async def first_use_inside_a_later_session() -> None:
        async with db.scope() as outer_session, db.new_session() as inner:
            await inner.execute(insert(items).values(key="inner"))
            await outer_session.execute(insert(items).values(key="outer"))
        # The inner block ends first, but its savepoint is under the outer session's.

    async with rolled_back(db):
        with pytest.raises(AsgiSqlaError, match="a session opened inside another must end"):
            await first_use_inside_a_later_session()


@pytest.mark.anyio
async def test_a_session_waiting_too_long_for_its_turn_is_told_why(db: Database) -> None:
    errors: list[ConnectionTurnTimeout] = []
    request_done = anyio.Event()
    async with rolled_back(db, wait_timeout=0.2), client_of(items_app(db)) as client:

        async def send_request() -> None:
            try:
                await client.post("/items/late")
            except ConnectionTurnTimeout as exc:
                errors.append(exc)
            finally:
                request_done.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(send_request)  # its task is not inside the scope below
            async with db.scope() as session:
                await session.execute(insert(items).values(key="held"))
                with anyio.fail_after(5):
                    await request_done.wait()  # while the scope holds the connection

        assert len(errors) == 1
        assert "waited 0.2 s for its turn" in str(errors[0])
        assert "held by task" in str(errors[0])
        assert await listed(client) == ["held"]


@pytest.mark.anyio
async def test_an_app_called_on_another_event_loop_is_told_to_use_the_test_loop(
    db: Database,
) -> None:
    # What Starlette's TestClient does: run the app on a loop of its own, in a thread.
    async def call() -> None:
        async with client_of(items_app(db)) as client:
            await client.post("/items/x")

    async with rolled_back(db):
        with pytest.raises(ConfigurationError) as error:
            await anyio.to_thread.run_sync(asyncio.run, call())
    assert "another event loop" in str(error.value)
    assert "httpx.ASGITransport" in str(error.value)


@pytest.mark.anyio
async def test_a_lifespan_driven_in_the_test_leaves_the_engine_to_the_plugin(
    db: Database,
) -> None:
    app = items_app(db)
    async with rolled_back(db) as outer, client_of(app) as client:
        engine = db.engine
        async with LifespanManager(app):  # startup checks the engine, shutdown disposes
            assert (await client.post("/items/a")).status_code == 201
        assert db.engine is engine
        assert await listed(client) == ["a"]
        assert (await outer.connection().execute(select(items.c.key))).scalars().all() == ["a"]
    assert started_engine(db) is None  # disposed by the plugin once the test's transaction ended
    assert await keys(db) == set()


@pytest.mark.anyio
async def test_outer_transaction_names_its_connections(db: Database, tmp_path: Path) -> None:
    other = Database(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}")
    async with rolled_back(db, other) as outer:
        assert outer.databases == (db, other)
        assert outer.connection(other).engine.url.database == str(tmp_path / "other.db")
        with pytest.raises(ConfigurationError, match="say which"):
            outer.connection()
        with pytest.raises(ConfigurationError, match="already bound"):
            async with rolled_back(db):
                pass
    for databases in [(), (db, db), ("sqlite://",)]:
        with pytest.raises(ConfigurationError):
            async with rolled_back(*databases):  # type: ignore[arg-type]
                pass


@pytest.mark.anyio
async def test_deferred_constraints_fail_the_apps_commit_and_keep_their_mode(
    postgresql_url: str,
) -> None:
    db = await open_database(postgresql_url)

    async def orphan(request: Request) -> Response:
        await orphan_child(db)
        return PlainTextResponse("", status_code=201)

    async def child_first(request: Request) -> Response:  # valid only if still deferred
        await db.session.execute(text("INSERT INTO children (id, parent_id) VALUES (2, 2)"))
        await db.session.execute(text("INSERT INTO parents (id) VALUES (2)"))
        return PlainTextResponse("", status_code=201)

    routes = [Route("/orphan", orphan, methods=["POST"]), Route("/pair", child_first)]
    app = SQLAlchemyMiddleware(Starlette(routes=routes), db)
    try:
        async with rolled_back(db) as outer, client_of(app) as client:
            assert (await client.post("/orphan")).status_code == 500
            assert (await client.get("/pair")).status_code == 201
            count = await outer.connection().scalar(text("SELECT count(*) FROM children"))
            assert count == 1  # the orphan was rolled back, the pair committed
        assert query(postgresql_url, "SELECT count(*) FROM children") == [(0,)]
    finally:
        await db.dispose()


@pytest.mark.anyio
async def test_a_read_only_route_refuses_writes_and_leaves_the_test_writable(
    postgresql_url: str,
) -> None:
    db = Database(postgresql_url)
    await create_tables(db)
    try:
        app = items_app(db, read_only=["/items/ro*"])
        async with rolled_back(db), client_of(app, raise_app_exceptions=False) as client:
            assert (await client.post("/items/ro-1")).status_code == 500
            assert (await client.post("/items/rw-1")).status_code == 201
            assert await listed(client) == ["rw-1"]
    finally:
        await db.dispose()


@pytest.mark.anyio
async def test_a_two_phase_commit_becomes_a_plain_one_in_the_test(
    postgres_database: URL, request: pytest.FixtureRequest
) -> None:
    factory: _postgres.DatabaseFactory = request.getfixturevalue("_postgres_databases")
    second_url = factory.create()
    first = Database(postgres_database.set(drivername="postgresql+asyncpg"))
    second = Database(second_url.set(drivername="postgresql+asyncpg"))
    try:
        for database in (first, second):
            await create_tables(database)

        async def both(request: Request) -> Response:
            for database in (first, second):
                await database.session.execute(insert(items).values(key="both"))
            return PlainTextResponse("", status_code=201)

        app = SQLAlchemyMiddleware(
            Starlette(routes=[Route("/", both, methods=["POST"])]), first, second, two_phase=True
        )
        async with rolled_back(first, second) as outer, client_of(app) as client:
            assert (await client.post("/")).status_code == 201
            for database in (first, second):
                rows = await outer.connection(database).execute(select(items.c.key))
                assert rows.scalars().all() == ["both"]
        for database in (first, second):
            assert await keys(database) == set()
        prepared = query(str(postgres_database), "SELECT count(*) FROM pg_prepared_xacts")
        assert prepared == [(0,)]
    finally:
        await first.dispose()
        await second.dispose()
        factory.drop(second_url)


@pytest.mark.anyio
async def test_read_session_reads_the_tests_rows_instead_of_a_replica(database_url: str) -> None:
    # The "replica" is the same database on other connections: it sees only what is
    # committed for real, so nothing the test wrote.
    db = Database(database_url, replicas=[database_url])
    await create_tables(db)

    async def read(request: Request) -> Response:
        return JSONResponse(list(await db.read_session.scalars(select(items.c.key))))

    app = items_app(db)
    app.app.router.routes.append(Route("/read", read))  # type: ignore[attr-defined]
    try:
        async with rolled_back(db), client_of(app) as client:
            assert (await client.post("/items/a")).status_code == 201
            assert (await client.get("/read")).json() == ["a"]
    finally:
        await db.dispose()


@pytest.mark.anyio
async def test_a_join_transaction_mode_of_the_app_gives_way_to_the_tests_savepoints(
    tmp_path: Path,
) -> None:
    # The app's own mode is for its own engine; in a test every session must join the
    # test's transaction through a savepoint, or its commit would end the test's.
    options = {"session_options": {"join_transaction_mode": "rollback_only"}}
    db = await open_database(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}", **options)
    sync_db = open_sync_database(f"sqlite:///{tmp_path / 'sync.db'}", **options)
    try:
        async with rolled_back(db, sync_db) as outer:
            async with db.scope() as session:
                await session.execute(insert(items).values(key="async"))

            def write_sync() -> None:
                with sync_db.scope() as sync_session:
                    sync_session.execute(insert(items).values(key="sync"))

            await anyio.to_thread.run_sync(write_sync)
            async_rows = await outer.connection(db).execute(select(items.c.key))
            assert async_rows.scalars().all() == ["async"]
            assert outer.connection(sync_db).execute(select(items.c.key)).scalars().all() == [
                "sync"
            ]
        assert await keys(db) == set()
        assert sync_keys(sync_db) == set()
    finally:
        await db.dispose()
        sync_db.dispose()
