"""The pytest plugin for ``SyncDatabase``: synchronous tests, ``TestClient``, ``def`` endpoints.

The first half runs a small user test file (a FastAPI app with ``def`` endpoints and
``session_dependency``, tested with FastAPI's ``TestClient`` and ``db.scope()``) with
``pytester`` on SQLite, psycopg and psycopg2, then checks on a new connection that no
row persisted; and the errors of a wrong set-up.  The second half tests the machinery
through ``rolled_back_sync()`` with Starlette's ``TestClient``: sessions of several
threads taking turns on the shared connection, nesting, the timeout, the lifespan, and
an async test binding a ``Database`` and a ``SyncDatabase`` under one turn.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest
from sqlalchemy import event, insert, select
from sqlalchemy.orm import Session, registry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from asgi_sqla import ConfigurationError, Database, SQLAlchemyMiddleware, SyncDatabase
from asgi_sqla.pytest_plugin import ConnectionTurnTimeout, rolled_back, rolled_back_sync

from _helpers import (
    items,
    keys,
    open_database,
    open_sync_database,
    query,
    started_engine,
    sync_keys,
)

# Loaded here, so that the in-process pytester runs find them loaded and do not import
# them again (see tests/test_pytest_plugin.py).
for _module in (
    "fastapi",
    "fastapi.testclient",
    "psycopg",
    "psycopg2",
    "sqlalchemy.dialects.postgresql.psycopg",
    "sqlalchemy.dialects.postgresql.psycopg2",
    "sqlalchemy.dialects.sqlite.pysqlite",
):
    __import__(_module)

# -- user test files, run with pytester ---------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

INNER_INI = """\
[pytest]
addopts = -p no:cacheprovider
filterwarnings = error
"""

#: A FastAPI app as its SQL tutorial writes it, on a SyncDatabase: `def` endpoints.
USER_SYNC_APP = """
import os
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text
from sqlalchemy.orm import Session

from asgi_sqla import SQLAlchemyMiddleware, SyncDatabase
from asgi_sqla.fastapi import session_dependency

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(64), nullable=False, unique=True),
)
db = SyncDatabase(os.environ["DATABASE_URL"])
SessionDep = Annotated[Session, Depends(session_dependency(db))]


def add_item(session, key):
    session.execute(insert(items).values(key=key))


def item_keys(session):
    return list(session.scalars(select(items.c.key).order_by(items.c.key)))


api = FastAPI()


@api.post("/items/{key}", status_code=201)
def create(key: str, session: SessionDep) -> str:
    add_item(session, key)
    if key.startswith("bad"):
        raise HTTPException(status_code=400, detail="no bad keys")
    return key


@api.get("/items")
def listing(session: SessionDep) -> list[str]:
    return item_keys(session)


def item_count(session: SessionDep) -> int:
    return len(item_keys(session))  # a def dependency: a thread call of its own


@api.post("/audited/{key}", status_code=201)
def audited(key: str, session: SessionDep, count: Annotated[int, Depends(item_count)]) -> int:
    add_item(session, key)
    with db.new_session() as audit:  # its own transaction, in production
        add_item(audit, f"audit of {key}")
    return count


@api.post("/orphans", status_code=201)
def orphan(session: SessionDep) -> None:
    # Its parent does not exist: the deferred foreign key fails at COMMIT.
    session.execute(text("INSERT INTO children (id, parent_id) VALUES (1, 999)"))


app = SQLAlchemyMiddleware(api, db)
"""

USER_SYNC_CONFTEST = """
import pytest

from user_sync_app import add_item, db


@pytest.fixture
def asgi_sqla_databases():
    return db


@pytest.fixture
def seeded(asgi_sqla_sync_transaction):
    with db.scope() as session:
        add_item(session, "seeded")
"""

USER_SYNC_TESTS = """
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from user_sync_app import add_item, app, db, items

pytestmark = pytest.mark.usefixtures("asgi_sqla_sync_transaction")


@pytest.fixture
def client():
    return TestClient(app)


def test_a_commit_is_seen_by_the_next_request(client):
    assert client.post("/items/a").status_code == 201
    assert client.get("/items").json() == ["a"]


def test_the_previous_test_left_nothing(client):
    assert client.get("/items").json() == []


def test_a_4xx_rolls_back_to_its_savepoint(client):
    assert client.post("/items/bad").status_code == 400
    assert client.post("/items/b").status_code == 201
    assert client.get("/items").json() == ["b"]


def test_the_test_connection_sees_what_the_app_committed(client, asgi_sqla_sync_transaction):
    client.post("/items/c")
    rows = asgi_sqla_sync_transaction.connection().execute(select(items.c.key))
    assert rows.scalars().all() == ["c"]


def test_db_scope_in_the_test_body(client):
    with db.scope() as session:
        add_item(session, "s")
    with pytest.raises(LookupError), db.scope() as session:
        add_item(session, "undone")
        raise LookupError
    with db.scope() as session:
        add_item(session, "rolled back")
        session.rollback()
    with db.scope() as session:
        add_item(session, "held")
        # The request nests in this block's turn on the connection.
        assert client.post("/items/sent-inside").status_code == 201
    assert client.get("/items").json() == ["held", "s", "sent-inside"]


def test_a_new_session_in_an_endpoint_nests_in_the_one_its_dependency_used(client):
    assert client.post("/audited/x").json() == 0
    assert client.get("/items").json() == ["audit of x", "x"]


def test_a_sync_fixture_seeds_rows_with_db_scope(seeded, client):
    assert client.get("/items").json() == ["seeded"]


def test_a_deferred_constraint_fails_the_commit_with_a_500(client, asgi_sqla_sync_transaction):
    on_postgresql = db.engine.dialect.name == "postgresql"
    # SQLite checks deferred foreign keys at the outermost COMMIT only, never in a test.
    assert client.post("/orphans").status_code == (500 if on_postgresql else 201)
    children = asgi_sqla_sync_transaction.connection().scalar(
        text("SELECT count(*) FROM children")
    )
    assert children == (0 if on_postgresql else 1)


def test_concurrent_requests_from_threads_keep_their_own_outcome(client):
    keys = [f"{prefix}{i}" for i in range(4) for prefix in ("k", "bad")]
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda key: client.post(f"/items/{key}").status_code, keys))
    assert sorted(statuses) == [201] * 4 + [400] * 4
    assert client.get("/items").json() == [f"k{i}" for i in range(4)]


def test_the_lifespan_runs_inside_the_transaction():
    with TestClient(app) as client:
        assert client.post("/items/in-lifespan").status_code == 201
    assert TestClient(app).get("/items").json() == ["in-lifespan"]
"""


@pytest.fixture
def user_sync_files(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".ini", pytest=INNER_INI)
    pytester.makepyfile(user_sync_app=USER_SYNC_APP, conftest=USER_SYNC_CONFTEST)
    pytester.syspathinsert()
    return pytester


def create_tables(url: str) -> None:
    """Create ``items``, ``parents`` and ``children`` (deferred key), committed, at ``url``."""
    open_sync_database(url).dispose()


def committed(url: str) -> list[tuple[Any, ...]]:
    """The committed ``items.key`` values and the count of children, on a new connection."""
    return sorted(query(url, "SELECT key FROM items")) + query(url, "SELECT count(*) FROM children")


def test_a_synchronous_user_test_file_runs_each_test_in_a_transaction_that_leaves_nothing(
    user_sync_files: pytest.Pytester, sync_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_tables(sync_database_url)
    monkeypatch.setenv("DATABASE_URL", sync_database_url)
    user_sync_files.makepyfile(test_user_sync=USER_SYNC_TESTS)

    result = user_sync_files.runpytest()

    result.assert_outcomes(passed=10)
    assert committed(sync_database_url) == [(0,)]


def test_the_sqlmodel_example_test_file_passes_and_leaves_no_rows(
    pytester: pytest.Pytester, sync_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The examples' conftest gives each test this database instead of a file of its own.
    monkeypatch.setenv("EXAMPLES_DATABASE_URL", sync_database_url)
    # In a process of its own: the example reads DATABASE_URL when it starts, and its
    # SQLModel tables live in SQLModel's one metadata, which a second import would
    # define again.
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES.parent))
    pytester.makefile(".ini", pytest=INNER_INI)

    result = pytester.runpytest_subprocess(
        str(EXAMPLES / "test_sqlmodel_app.py"),
        "-c",
        str(pytester.path / "pytest.ini"),
        "--rootdir",
        str(pytester.path),
    )

    result.assert_outcomes(passed=5)
    assert query(sync_database_url, "SELECT count(*) FROM hero") == [(0,)]


def test_without_the_sync_fixture_the_same_tests_leave_their_rows(
    user_sync_files: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The plugin is inert unless a test asks for it, and the check above can fail.
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    create_tables(url)
    monkeypatch.setenv("DATABASE_URL", url)
    user_sync_files.makepyfile(
        test_user_sync=USER_SYNC_TESTS.replace(
            'pytestmark = pytest.mark.usefixtures("asgi_sqla_sync_transaction")', ""
        )
    )

    result = user_sync_files.runpytest("-k", "a_commit_is_seen or previous_test_left_nothing")

    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED *test_the_previous_test_left_nothing*"])
    assert committed(url) == [("a",), (0,)]


def test_a_wrong_set_up_of_the_sync_fixture_is_told_how_to_fix_it(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makefile(".ini", pytest=INNER_INI)
    pytester.makepyfile(
        test_undefined="""
        def test_without_asgi_sqla_databases(asgi_sqla_sync_transaction):
            pass
        """,
        test_async_database=f"""
        import pytest

        from asgi_sqla import Database


        @pytest.fixture
        def asgi_sqla_databases():
            return [Database("sqlite+aiosqlite:///{tmp_path / "async.db"}")]


        def test_with_an_async_database(asgi_sqla_sync_transaction):
            pass
        """,
    )

    result = pytester.runpytest()

    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*asgi_sqla_sync_transaction need to know your app's databases: define a "
            "fixture named asgi_sqla_databases*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*asgi_sqla_sync_transaction binds SyncDatabase objects, for synchronous tests, "
            "and asgi_sqla_databases returned Database('sqlite+aiosqlite:*async.db'), an "
            "async Database*Test this app in async tests (@pytest.mark.anyio) with "
            "asgi_sqla_transaction*",
        ]
    )


def test_rolled_back_sync_refuses_what_it_cannot_bind(tmp_path: Path) -> None:
    async_db = Database(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
    sync_db = SyncDatabase(f"sqlite:///{tmp_path / 'sync.db'}")
    refusals = {
        (async_db,): "is an async Database: bind it with `async with rolled_back(...)`",
        (): "No database was given",
        (sync_db, sync_db): "was given twice",
        ("sqlite://",): "Expected the app's asgi_sqla Database or SyncDatabase objects, got str",
    }
    for databases, message in refusals.items():
        with (
            pytest.raises(ConfigurationError, match=re.escape(message)),
            rolled_back_sync(
                *databases  # type: ignore[arg-type]
            ),
        ):
            pass
    assert started_engine(sync_db) is None  # nothing was connected


# -- the machinery, through rolled_back_sync() --------------------------------------------


class Item:
    """``items`` mapped, for the ORM's bulk methods."""

    id: int
    key: str


registry().map_imperatively(Item, items)


def sync_items_app(
    db: SyncDatabase, *, before_write: Callable[[], object] | None = None
) -> SQLAlchemyMiddleware:
    """POST /items/{key} inserts (400 for keys starting with "bad"), GET /items lists.

    ``def`` endpoints: Starlette runs them in its worker threads.  ``before_write`` runs
    in the endpoint's thread before its first statement.
    """

    def create(request: Request) -> Response:
        key = request.path_params["key"]
        if before_write is not None:
            before_write()
        db.session.execute(insert(items).values(key=key))
        return PlainTextResponse(key, status_code=400 if key.startswith("bad") else 201)

    def listing(request: Request) -> Response:
        return JSONResponse(list(db.session.scalars(select(items.c.key).order_by(items.c.key))))

    routes = [Route("/items/{key}", create, methods=["POST"]), Route("/items", listing)]
    return SQLAlchemyMiddleware(Starlette(routes=routes), db)


@pytest.fixture
def statements(sync_db: SyncDatabase) -> Iterator[list[str]]:
    """The statements sent to ``sync_db`` (savepoints and writes), in order."""
    sent: list[str] = []

    def before_cursor_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "asgi_sqla_check" not in statement:
            sent.append(statement.split("(")[0].strip())

    engine = sync_db.engine
    event.listen(engine, "before_cursor_execute", before_cursor_execute)
    yield sent
    event.remove(engine, "before_cursor_execute", before_cursor_execute)


def test_concurrent_requests_from_threads_take_turns_on_the_connection(
    sync_db: SyncDatabase, statements: list[str]
) -> None:
    request_keys = [f"{prefix}{i}" for i in range(3) for prefix in ("k", "bad")]
    # Every endpoint is in its thread, about to write, before any of them writes.
    all_in = threading.Barrier(len(request_keys), timeout=10)
    app = sync_items_app(sync_db, before_write=all_in.wait)

    def post(key: str) -> int:
        status: int = TestClient(app).post(f"/items/{key}").status_code
        return status

    with rolled_back_sync(sync_db):
        with ThreadPoolExecutor(len(request_keys)) as pool:
            statuses = list(pool.map(post, request_keys))
        kinds = ("SAVEPOINT sa_", "INSERT", "RELEASE SAVEPOINT sa_", "ROLLBACK TO SAVEPOINT sa_")
        writes = [s for s in statements if s.startswith(kinds)]

        assert sorted(statuses) == [201] * 3 + [400] * 3
        assert TestClient(app).get("/items").json() == ["k0", "k1", "k2"]
    # Each request's savepoint ended before the next one began: never two open at once.
    assert len(writes) == 18
    for begin, write, end in zip(writes[::3], writes[1::3], writes[2::3], strict=True):
        assert begin.startswith("SAVEPOINT"), writes
        assert write.startswith("INSERT INTO items"), writes
        assert end.startswith(("RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT")), writes
    assert sync_keys(sync_db) == set()


def test_a_session_opened_inside_a_def_endpoint_uses_the_connection_without_waiting(
    sync_db: SyncDatabase,
) -> None:
    def handler(request: Request) -> Response:
        sync_db.session.execute(insert(items).values(key="request"))
        with sync_db.new_session() as audit:  # nested, in the same thread
            audit.execute(insert(items).values(key="audit"))
        return PlainTextResponse("ok", status_code=201)

    app = SQLAlchemyMiddleware(Starlette(routes=[Route("/", handler, methods=["POST"])]), sync_db)
    with rolled_back_sync(sync_db, wait_timeout=5) as outer:
        assert TestClient(app).post("/").status_code == 201
        rows = outer.connection(sync_db).execute(select(items.c.key))

        assert sorted(rows.scalars()) == ["audit", "request"]
        assert outer.databases == (sync_db,)
    assert sync_keys(sync_db) == set()


def test_a_sync_session_waiting_too_long_for_its_turn_is_told_why(sync_db: SyncDatabase) -> None:
    errors: list[BaseException] = []
    app = sync_items_app(sync_db)

    def send_request() -> None:
        try:
            TestClient(app).post("/items/late")
        except ConnectionTurnTimeout as exc:
            errors.append(exc)

    with rolled_back_sync(sync_db, wait_timeout=0.2):
        with sync_db.scope() as session:
            session.execute(insert(items).values(key="held"))
            # A new thread starts from an empty context: its request is not inside
            # this block, so it waits for the block to end, which waits for it.
            sender = threading.Thread(target=send_request)
            sender.start()
            sender.join(timeout=10)

        assert len(errors) == 1
        assert "waited 0.2 s for its turn" in str(errors[0])
        assert "held by thread 'MainThread'" in str(errors[0])
        assert TestClient(app).get("/items").json() == ["held"]


def test_a_lifespan_run_by_the_test_client_leaves_the_engine_to_the_plugin(
    sync_db: SyncDatabase,
) -> None:
    app = sync_items_app(sync_db)
    with rolled_back_sync(sync_db) as outer:
        engine = sync_db.engine
        with TestClient(app) as client:  # startup checks the engine, shutdown disposes
            assert client.post("/items/a").status_code == 201
        assert sync_db.engine is engine
        assert outer.connection().execute(select(items.c.key)).scalars().all() == ["a"]
    assert started_engine(sync_db) is None  # disposed by the plugin once the test ended
    assert sync_keys(sync_db) == set()


@pytest.mark.anyio
async def test_an_async_test_binds_a_database_and_a_sync_database_under_one_turn(
    tmp_path: Path,
) -> None:
    async_db = await open_database(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
    sync_db = open_sync_database(f"sqlite:///{tmp_path / 'sync.db'}")

    async def both(request: Request) -> Response:
        key = request.path_params["key"]

        async def write_async() -> None:
            await async_db.session.execute(insert(items).values(key=key))
            await anyio.lowlevel.checkpoint()  # concurrent requests run here

        async def write_sync() -> None:
            await anyio.to_thread.run_sync(
                lambda: sync_db.session.execute(insert(items).values(key=key))
            )

        # Half the requests use the databases in the other order: with a turn per
        # kind of database they would deadlock, each holding what the other waits for.
        steps = (write_sync, write_async) if key.startswith("s") else (write_async, write_sync)
        for step in steps:
            await step()
        return PlainTextResponse(key, status_code=201)

    app = SQLAlchemyMiddleware(
        Starlette(routes=[Route("/{key}", both, methods=["POST"])]), async_db, sync_db
    )
    transport = httpx.ASGITransport(app=app)
    try:
        async with (
            rolled_back(async_db, sync_db, wait_timeout=5) as outer,
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):
            with anyio.fail_after(10):
                responses = await asyncio.gather(
                    *(client.post(f"/{p}{i}") for i in range(4) for p in ("a", "s"))
                )
            expected = sorted(f"{p}{i}" for i in range(4) for p in ("a", "s"))

            assert [r.status_code for r in responses] == [201] * 8
            async_rows = await outer.connection(async_db).execute(select(items.c.key))
            assert sorted(async_rows.scalars()) == expected
            sync_rows = outer.connection(sync_db).execute(select(items.c.key))
            assert sorted(sync_rows.scalars()) == expected
            assert outer.databases == (async_db, sync_db)
            with pytest.raises(ConfigurationError, match="say which"):
                outer.connection()
        assert await keys(async_db) == set()
        assert sync_keys(sync_db) == set()
    finally:
        await async_db.dispose()
        sync_db.dispose()


@pytest.mark.anyio
async def test_an_async_test_may_bind_sync_databases_alone(tmp_path: Path) -> None:
    sync_db = open_sync_database(f"sqlite:///{tmp_path / 'sync.db'}")
    transport = httpx.ASGITransport(app=sync_items_app(sync_db))  # def endpoints, in threads
    try:
        async with (
            rolled_back(sync_db) as outer,
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):
            assert (await client.post("/items/a")).status_code == 201
            assert (await client.post("/items/bad")).status_code == 400

            rows = outer.connection(sync_db).execute(select(items.c.key))
            assert rows.scalars().all() == ["a"]
            with pytest.raises(ConfigurationError, match=r"is a SyncDatabase: pass it"):
                outer.connection()
        assert sync_keys(sync_db) == set()
    finally:
        sync_db.dispose()


def _bulk_save(session: Session) -> None:
    item = Item()
    item.key = "bulk"
    session.bulk_save_objects([item])


@pytest.mark.parametrize(
    "bulk_write",
    [
        pytest.param(_bulk_save, id="bulk_save_objects"),
        pytest.param(lambda s: s.bulk_insert_mappings(Item, [{"key": "bulk"}]), id="insert"),
        pytest.param(lambda s: s.bulk_update_mappings(Item, [{"id": 1, "key": "b"}]), id="update"),
    ],
)
def test_the_orm_bulk_methods_wait_for_their_turn_too(
    tmp_path: Path, bulk_write: Callable[[Session], None]
) -> None:
    # They reach the connection through the session's transaction, past the session's
    # own way in: unless they wait for the turn first, they begin a savepoint on top
    # of the holder's and the plugin's last check refuses them.
    sync_db = open_sync_database(f"sqlite:///{tmp_path / 'sync.db'}")
    errors: list[BaseException] = []

    def write_in_a_new_thread() -> None:
        try:
            with sync_db.scope() as session:
                bulk_write(session)
        except Exception as exc:
            errors.append(exc)

    try:
        with rolled_back_sync(sync_db, wait_timeout=0.2), sync_db.scope() as session:
            session.execute(insert(items).values(key="held"))
            writer = threading.Thread(target=write_in_a_new_thread)
            writer.start()
            writer.join(timeout=10)

        assert [type(error) for error in errors] == [ConnectionTurnTimeout], errors
    finally:
        sync_db.dispose()
